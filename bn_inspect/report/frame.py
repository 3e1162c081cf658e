"""A report as a pandas DataFrame: one row per layer call and channel (what the CSV export writes).

``distance`` is the channel's 2-Wasserstein distance in running stds and ``departure`` its layer's
score (report/departure.py), repeated on each of the layer's rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from bn_inspect.report.records import Report


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
    "distance",
    "departure",
    "weight",
    "bias",
)


def report_frame(report: Report) -> pd.DataFrame:
    """One row per layer call and channel; layers without per-channel statistics get one row."""
    import pandas as pd

    from bn_inspect.report.departure import channel_distances, departure

    rows = []
    for layer in report.layers:
        num_channels = len(layer.batch_mean or layer.running_mean or ())
        found = departure(layer)
        distances = None
        if found is not None and layer.batch_mean and layer.batch_var and layer.running_mean and layer.running_var:
            distances = channel_distances(
                layer.batch_mean, layer.batch_var, layer.running_mean, layer.running_var, layer.eps or 0.0
            )
        per_channel = {
            "batch_mean": layer.batch_mean,
            "running_mean": layer.running_mean,
            "batch_var": layer.batch_var,
            "batch_var_unbiased": layer.batch_var_unbiased,
            "running_var": layer.running_var,
            "mean_shift_z": layer.mean_shift_z,
            "var_ratio": layer.var_ratio,
            "distance": distances,
            "weight": layer.weight,
            "bias": layer.bias,
        }
        common = {
            # A DataFrame is data, as JSON is: the exact text; the CSV writer makes it inert.
            "layer": layer.name.raw,
            "call": layer.call,
            "type": layer.type.raw,
            "values_per_channel": layer.values_per_channel,
            "normalizes_with": layer.normalizes_with,
            "departure": None if found is None else found.score,
        }
        if num_channels == 0:
            rows.append({**common, "channel": None})
        for c in range(num_channels):
            row = {**common, "channel": c}
            for key, values in per_channel.items():
                row[key] = values[c] if values is not None and c < len(values) else None
            rows.append(row)
    frame: pd.DataFrame = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    frame["channel"] = frame["channel"].astype("Int64")
    frame["values_per_channel"] = frame["values_per_channel"].astype("Int64")
    return frame
