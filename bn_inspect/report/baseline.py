"""check --baseline: the BN3xx rules, which judge a model (and its data) against a known-good report.

* BN301 running-drift: a layer's running statistics moved beyond the tolerance since the baseline.
* BN302 data-drift: the model's running statistics and layers are as in the baseline, but the batch
  statistics on the data moved beyond the tolerance: the data changed (same model, new data).
* BN303 layers-changed: a layer call was added, removed or renamed, or its channel count changed.

Changes are report/diff.py's (mean changes in OLD standard deviations, var ratios new / old).
Without data (--no-data) only BN301 and BN303 run, on the model's stored layer states.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from bn_inspect.report.comparability import comparability_notes
from bn_inspect.report.departure import Thresholds
from bn_inspect.report.diff import (
    ADDED,
    CHANNELS,
    REMOVED,
    RENAMED,
    LayerChange,
    StatChange,
    Tolerance,
    diff_layers,
    what_changed,
)
from bn_inspect.report.findings import RULES, Finding
from bn_inspect.report.records import LayerReport, LayerState, Report
from bn_inspect.text import Untrusted

# A NaN change lists this many channels, then counts the rest.
_CHANNELS_SHOWN = 8
_REWRITE = "If the change is intended, record a new baseline with --write-baseline PATH --force"


@dataclass(frozen=True)
class Baseline:
    """A known-good inspection report, and how far statistics may move from it."""

    report: Report
    tolerance: Tolerance = field(default_factory=Tolerance)


def baseline_findings(
    known_good: Baseline, current: Report | None, states: Sequence[LayerState], thresholds: Thresholds
) -> tuple[list[Finding], list[str]]:
    """BN301, BN302 and BN303 findings of the model against ``known_good``, and notes on what was compared.

    Args:
        known_good: the baseline report and the tolerance.
        current: this run's inspection report; None without data (--no-data).
        states: the model's normalization layers as stored (used without data).
        thresholds: for the departure verdicts the comparison carries.
    """
    baseline, tolerance = known_good.report, known_good.tolerance
    if current is None:
        changes = diff_layers(_running_only(baseline.layers), [_as_layer(s) for s in states], tolerance, thresholds)
        notes = ["no data: only running statistics (BN301) and the layer set (BN303) were compared with the baseline"]
        by_label = {layer.label: layer for layer in _running_only(baseline.layers)}
        by_label |= {s.name: _as_layer(s) for s in states}
    else:
        changes = diff_layers(baseline.layers, current.layers, tolerance, thresholds)
        notes = comparability_notes(baseline, current, ("the baseline", "this run"))
        by_label = {layer.label: layer for layer in (*baseline.layers, *current.layers)}
    if any(c.is_beyond for c in changes):
        notes.insert(0, f"against the baseline, {what_changed(changes)}")
    findings = [_structural(c, by_label) for c in changes if c.status in (ADDED, REMOVED, RENAMED, CHANNELS)]
    # by_label holds this run's layer where both have one; a NaN change is explained from both sides.
    old_by_label = {layer.label: layer for layer in baseline.layers}
    findings += _running_drift(changes, by_label, old_by_label, tolerance)
    if current is not None:
        findings += _data_drift(
            changes, by_label, old_by_label, tolerance, notes, comparable=baseline.mode == current.mode
        )
    return findings, notes


def _beyond(change: StatChange | None, tolerance: Tolerance) -> bool:
    return change is not None and tolerance.size(change.mean_change, change.var_ratio) > 1


def _running_only(layers: Sequence[LayerReport]) -> list[LayerReport]:
    """Each layer's first call, without what the data did: what --no-data can compare with."""
    return [
        dataclasses.replace(layer, input_shape=None, batch_mean=None, batch_var=None, batch_var_unbiased=None)
        for layer in layers
        if layer.call == 0
    ]


def _as_layer(state: LayerState) -> LayerReport:
    """A stored layer state as a layer call that saw no data."""
    return LayerReport(
        name=state.name,
        call=0,
        type=state.type,
        family=state.family,
        num_channels=state.num_channels,
        input_shape=None,
        axis_names=None,
        reduced_axes=None,
        values_per_channel=None,
        eps=state.eps,
        momentum=state.momentum,
        affine=state.affine,
        track_running_stats=state.track_running_stats,
        num_batches_tracked=state.num_batches_tracked,
        normalizes_with=state.eval_uses,
        batch_mean=None,
        batch_var=None,
        batch_var_unbiased=None,
        running_mean=state.running_mean,
        running_var=state.running_var,
        weight=state.weight,
        bias=state.bias,
        explanation=Untrusted(""),
    )


def _finding(code: str, layer: LayerReport, message: str, channels: tuple[int, ...] = ()) -> Finding:
    rule = RULES[code]
    return Finding(code, rule.name, rule.severity, layer.name, layer.call, channels, message)


def _channels_beyond(change: StatChange, tolerance: Tolerance) -> tuple[int, ...]:
    """The channels whose own change is beyond the tolerance (NaN counts as beyond, as for the layer)."""
    return tuple(
        c
        for c, (mean_change, var_ratio) in enumerate(zip(change.mean_change, change.var_ratio, strict=True))
        if tolerance.size((mean_change,), (var_ratio,)) > 1
    )


def _structural(change: LayerChange, by_label: dict[Untrusted, LayerReport]) -> Finding:
    """BN303: what changed in the layer set."""
    layer = by_label[change.new or change.old or Untrusted("")]
    what = {
        ADDED: f"{change.type} {change.new} was added since the baseline",
        REMOVED: f"{change.type} {change.old} of the baseline is gone",
        RENAMED: f"{change.old} of the baseline is now named {change.new} (same type, channels and input shape, "
        "same place)",
        CHANNELS: f"{change.label} has {change.new_channels} channels, {change.old_channels} in the baseline",
    }[change.status]
    return _finding("BN303", layer, f"{what}. {_REWRITE}")


def _moved(change: StatChange, kind: str, old: LayerReport | None, new: LayerReport) -> str:
    """How far the ``kind`` ("running" or "batch") statistics moved; a NaN change says which value is NaN."""
    values = {f"this model's {kind} {stat}": series for stat, series in _statistics(new, kind).items()}
    if old is not None:
        values |= {f"the baseline's {kind} {stat}": series for stat, series in _statistics(old, kind).items()}
    mean, ratio = change.max_abs_mean_change, change.worst_var_ratio
    parts = [
        f"mean by up to {mean:.4g} old std"
        if mean is None or not math.isnan(mean)
        else _nan_in("the mean change", change.mean_change, values),
        f"variance by a ratio of {ratio:.4g}"
        if ratio is None or not math.isnan(ratio)
        else _nan_in("the variance ratio", change.var_ratio, values),
    ]
    return ", ".join(parts)


def _nan_in(what: str, changes: Sequence[float], values: dict[str, tuple[float, ...]]) -> str:
    """``the variance ratio is NaN in channel 0 (this model's running variance is NaN there)``."""
    channels = [c for c, value in enumerate(changes) if math.isnan(value)]
    nan = [name for name, series in values.items() if any(math.isnan(series[c]) for c in channels)]
    why = f"{' and '.join(nan)} {'is' if len(nan) == 1 else 'are'} NaN there" if nan else "variances of 0 or below"
    return f"{what} is NaN in {_channel_list(channels)} ({why})"


def _statistics(layer: LayerReport, kind: str) -> dict[str, tuple[float, ...]]:
    """The layer's running or batch mean and (biased) variance, those it has."""
    mean, var = (layer.running_mean, layer.running_var) if kind == "running" else (layer.batch_mean, layer.batch_var)
    return {stat: series for stat, series in (("mean", mean), ("variance", var)) if series is not None}


def _channel_list(channels: Sequence[int]) -> str:
    shown = ", ".join(str(c) for c in channels[:_CHANNELS_SHOWN])
    more = f" and {len(channels) - _CHANNELS_SHOWN} more" if len(channels) > _CHANNELS_SHOWN else ""
    return f"channel{'s' if len(channels) > 1 else ''} {shown}{more}"


def _running_drift(
    changes: Sequence[LayerChange],
    by_label: dict[Untrusted, LayerReport],
    old_by_label: dict[Untrusted, LayerReport],
    tolerance: Tolerance,
) -> list[Finding]:
    """BN301: the running statistics moved beyond the tolerance."""
    return [
        _finding(
            "BN301",
            by_label[change.new or Untrusted("")],
            f"the running statistics moved beyond the tolerance since the baseline: {_moved(change.running, 'running', old_by_label.get(change.old or Untrusted('')), by_label[change.new or Untrusted('')])} "
            f"(tolerance: {tolerance.describe()}). The model's stored statistics changed: check the training run "
            f"or the checkpoint. {_REWRITE}",
            _channels_beyond(change.running, tolerance),
        )
        for change in changes
        if change.running is not None and _beyond(change.running, tolerance)
    ]


def _data_drift(
    changes: Sequence[LayerChange],
    by_label: dict[Untrusted, LayerReport],
    old_by_label: dict[Untrusted, LayerReport],
    tolerance: Tolerance,
    notes: list[str],
    *,
    comparable: bool,
) -> list[Finding]:
    """BN302 where only the data can explain a change: the layers and running statistics are as in the baseline."""
    drifted = [c for c in changes if _beyond(c.batch, tolerance)]
    if not drifted:
        return []
    model_changed = any(
        c.status in (ADDED, REMOVED, RENAMED, CHANNELS) or _beyond(c.running, tolerance) for c in changes
    )
    if model_changed or not comparable:
        why = "the model changed (BN301, BN303)" if model_changed else "the runs used other modes"
        inputs = "the 1 input that changed is" if len(drifted) == 1 else f"the {len(drifted)} inputs that changed are"
        notes.append(f"{inputs} not reported as data drift (BN302) because {why}")
        return []
    return [
        _finding(
            "BN302",
            by_label[change.new or Untrusted("")],
            "the batch statistics on the data moved beyond the tolerance since the baseline while the running "
            f"statistics did not: {_moved(change.batch, 'batch', old_by_label.get(change.old or Untrusted('')), by_label[change.new or Untrusted('')])} (tolerance: {tolerance.describe()}): the data drifted. "
            "Check the input pipeline (source, preprocessing, normalization) against the baseline's",
            _channels_beyond(change.batch, tolerance),
        )
        for change in drifted
        if change.batch is not None
    ]
