"""Why a model's data departs from its running statistics: a cause code and the pattern that led to it.

The caller says which layers depart (check's BN201); this module reads the stored buffers, and
report/cause_patterns.py the shape of the departure, and names the most likely cause, or
``unknown`` where the patterns it knows do not tell the causes apart. A wrong cause sends a user
the wrong way, so every rule asks for a pattern that the other causes do not produce; the rules and
their limits were tuned on the calibration half of the fault benchmark (benchmarks/faults/,
causes_eval.py), and the measured rates are in its README. The codes: report/cause_codes.py.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Collection, Iterable, Sequence
from dataclasses import replace

from bn_inspect.report.cause_codes import CAUSES as CAUSES
from bn_inspect.report.cause_codes import (
    FEW_BATCHES_TRACKED,
    MOMENTUM,
    PARTIAL_LOAD,
    PRECISION,
    SMALL_BATCH_TRAINING,
    UNKNOWN,
    Cause,
)
from bn_inspect.report.cause_patterns import FEW_BATCHES, shape_cause
from bn_inspect.report.findings import Finding, departing_past_error
from bn_inspect.report.records import LayerReport, LayerState, Report, at_initial_values
from bn_inspect.report.small_batch import estimate_beside, first_layer_departure

# The share of the departure that leaning toward mean 0, variance 1 must explain to name it.
PULL_EXPLAINS = 0.5
HALF_DTYPES = ("float16", "bfloat16")
# Values with this many mantissa bits or fewer are round numbers, float16 values by nature.
ROUND_NUMBER_BITS = 6


def model_cause(
    report: Report | None, states: Sequence[LayerState] = (), departed: Collection[str] = ()
) -> Cause | None:
    """The most likely cause of the model's departure, or None when no layer departs.

    Args:
        report: the inspection (None without data: only the stored buffers are read).
        states: the layers' stored state, where known (buffer dtypes, momentum).
        departed: the labels (``name`` or ``name#call``) of the layer calls that depart.

    Returns:
        The cause; ``unknown`` when the departure matches no pattern well enough.
    """
    if report is None or not departed:
        return None
    stats = [layer for layer in report.layers if layer.running_var is not None and layer.batch_var is not None]
    leaving = [layer for layer in stats if layer.label.raw in departed]
    if not leaving:
        return None
    by_name = {state.name.raw: state for state in states}
    layer_states = [by_name[layer.name.raw] for layer in leaving if layer.name.raw in by_name]
    return (
        _stored_cause(leaving, layer_states)
        or _statistics_cause(leaving[0])
        or shape_cause(report, stats, leaving[0])
        or _weak_cause(leaving, layer_states)
        or Cause(UNKNOWN, f"{leaving[0].label.raw} departs, but in no pattern that names one cause")
    )


def state_cause(state: LayerState) -> Cause | None:
    """The cause a layer's stored state shows by itself (float16, initial values, momentum)."""
    return _buffer_cause(state) or _weak_state_cause(state)


def _buffer_cause(state: LayerState) -> Cause | None:
    """Buffers that are wrong by themselves: never loaded, or overflowed in float16."""
    if at_initial_values(state.running_mean, state.running_var):
        return _initial_values_cause(state.name.raw, state.num_batches_tracked)
    values = state.running_var or ()
    if math.inf in values and (state.buffer_dtype in HALF_DTYPES or _looks_half_precision(values)):
        return _precision_cause(state.name.raw, values)
    return None


def _weak_state_cause(state: LayerState) -> Cause | None:
    """What the stored state may explain where the departure's shape names nothing: rounding to
    float16 moves a statistic by a thousandth, and a momentum says how the statistics would move,
    not that they moved wrong."""
    name = state.name.raw
    if state.buffer_dtype in HALF_DTYPES:
        return Cause(PRECISION, f"{name} stores its running statistics in {state.buffer_dtype}")
    if _looks_half_precision(state.running_var):
        return _precision_cause(name, state.running_var or ())
    if state.momentum is None or state.is_frozen or 0 < state.momentum < 0.5:
        return None
    return Cause(
        MOMENTUM,
        f"{name} has momentum {state.momentum:g}: its running statistics "
        + ("never move in training" if state.momentum == 0 else "keep little more than the last batch"),
    )


def _stored_cause(leaving: Sequence[LayerReport], states: Sequence[LayerState]) -> Cause | None:
    """What the departing layers' buffers show (from the states where given, else from the report)."""
    for state in states:
        cause = _buffer_cause(state)
        if cause is not None:
            return cause
    for layer in leaving:
        if at_initial_values(layer.running_mean, layer.running_var):
            return _initial_values_cause(layer.name.raw, layer.num_batches_tracked)
        if math.inf in (layer.running_var or ()) and _looks_half_precision(layer.running_var):
            return _precision_cause(layer.name.raw, layer.running_var or ())
    return None


def _weak_cause(leaving: Sequence[LayerReport], states: Sequence[LayerState]) -> Cause | None:
    for state in states:
        cause = _weak_state_cause(state)
        if cause is not None:
            return cause
    for layer in leaving:
        if _looks_half_precision(layer.running_var):
            return _precision_cause(layer.name.raw, layer.running_var or ())
    return None


def _initial_values_cause(name: str, num_batches_tracked: int | None) -> Cause:
    if num_batches_tracked:
        return Cause(
            MOMENTUM,
            f"{name} holds running mean 0 and variance 1 exactly, yet num_batches_tracked is "
            f"{num_batches_tracked:,}: the statistics were updated with momentum 0 and never moved",
        )
    return Cause(
        PARTIAL_LOAD,
        f"{name} holds running mean 0 and variance 1 exactly and num_batches_tracked "
        f"{num_batches_tracked if num_batches_tracked is not None else 'unknown'}: its buffers are "
        "a fresh layer's, never loaded from a trained model (a state_dict loaded with strict=False) "
        "or never trained",
    )


def _is_half(value: float) -> bool:
    if not math.isfinite(value):
        return False
    try:
        return bool(struct.unpack("e", struct.pack("e", value))[0] == value)
    except OverflowError:
        return False


def _looks_half_precision(running_var: Sequence[float] | None) -> bool:
    """Every finite variance is exactly a float16 value, and that says something: some overflowed to
    inf, or there are eight or more and some needs more bits than a round number (0.5, 3, 1.25) has."""
    values = running_var or ()
    finite = [v for v in values if math.isfinite(v)]
    if not finite or not all(map(_is_half, finite)):
        return False
    # A float32 value is a float16 one by chance 1 time in 8,192: eight in a row are not chance.
    overflowed = any(v == math.inf for v in values)
    return overflowed or (len(finite) >= 8 and any(_significant_bits(v) > ROUND_NUMBER_BITS for v in finite))


def _significant_bits(value: float) -> int:
    """How many bits of mantissa ``value`` needs (1 for a power of two)."""
    mantissa, _ = math.frexp(abs(value))
    bits = 0
    while mantissa and bits < 64:
        mantissa = mantissa * 2 - int(mantissa * 2)
        bits += 1
    return bits


def _precision_cause(name: str, running_var: Sequence[float]) -> Cause:
    overflowed = sum(v == math.inf for v in running_var)
    what = f"{overflowed} running variances of {name} are inf (above float16's 65,504)" if overflowed else ""
    rounded = f"every finite running variance of {name} is exactly a float16 value"
    return Cause(PRECISION, f"{what} and {rounded}" if what else rounded)


def _statistics_cause(layer: LayerReport) -> Cause | None:
    """Running statistics that lean toward mean 0, variance 1 as a short pass with momentum leaves them."""
    count, momentum = layer.num_batches_tracked, layer.momentum
    if not count or count > FEW_BATCHES or momentum is None or not 0 < momentum < 1:
        return None
    weight = 1 - (1 - momentum) ** count
    own = _mean_distance(layer, 1.0)
    leaning = _mean_distance(layer, weight)
    if weight < 0.99 and own > 0 and leaning <= PULL_EXPLAINS * own:
        return Cause(
            FEW_BATCHES_TRACKED,
            f"{layer.label.raw} has num_batches_tracked {count:,} at momentum {momentum:g}: its running "
            f"statistics still hold {1 - weight:.0%} of the initial mean 0 and variance 1, which explains "
            f"{1 - leaning / own:.0%} of how far they sit from the data",
        )
    return None


def _small_batch_cause(report: Report, findings: Sequence[Finding]) -> Cause | None:
    found = estimate_beside(report.layers, departing_past_error(findings))
    if found is None:
        return None
    first = first_layer_departure(report.layers)
    if first is not None:
        return Cause(
            UNKNOWN,
            f"batches of about {found.batch_size:.1f} samples and data that varies more between samples than the "
            f"training data leave the same gap, and the first layer's data departs too (score {first:.2g})",
        )
    return Cause(
        SMALL_BATCH_TRAINING,
        f"running variances short of the data's between-sample spread by what batches of about "
        f"{found.batch_size:.1f} samples leave out of their own variance",
    )


def _mean_distance(layer: LayerReport, weight: float) -> float:
    """The mean 2-Wasserstein distance, in running stds, between the running statistics and what a
    pass with ``weight`` on the data and 1 - weight on mean 0, variance 1 would leave."""
    eps = layer.eps or 0.0
    total, count = 0.0, 0
    for bm, bv, rm, rv in zip(
        layer.batch_mean or (), layer.batch_var or (), layer.running_mean or (), layer.running_var or (), strict=True
    ):
        if not all(map(math.isfinite, (bm, bv, rm, rv))) or rv + eps <= 0 or bv < 0:
            continue
        mean, var = weight * bm, (1 - weight) + weight * bv
        total += math.hypot(mean - rm, math.sqrt(var + eps) - math.sqrt(rv + eps)) / math.sqrt(rv + eps)
        count += 1
    return total / count if count else 0.0


def with_causes(
    findings: Iterable[Finding],
    report: Report | None,
    states: Sequence[LayerState],
    departed_labels: Collection[str] | None = None,
) -> list[Finding]:
    """``findings`` with the cause filled in where one follows.

    BN201 findings get the model's cause (``model_cause``); BN101, BN104, BN105 and BN109 the cause
    their layer's stored buffers show (``state_cause``); every other finding is left as it is.

    Args:
        findings: the check's findings.
        report: the inspection the data rules judged (None without data).
        states: the model's normalization layers as stored.
        departed_labels: the layer calls that depart; None takes those BN201 fired on.
    """
    findings = list(findings)
    if departed_labels is None:
        departed_labels = {f.label.raw for f in findings if f.code == "BN201"}
    cause = model_cause(report, states, departed_labels)
    by_name = {state.name.raw: state for state in states}
    out = []
    for finding in findings:
        found: Cause | None = None
        if finding.code == "BN201":
            found = cause
        elif finding.code == "BN205" and report is not None:
            found = _small_batch_cause(report, findings)
        elif finding.code in ("BN101", "BN104", "BN105", "BN109") and finding.layer is not None:
            state = by_name.get(finding.layer.raw)
            found = state_cause(state) if state is not None else None
        out.append(replace(finding, cause=found.code, cause_sentence=found.sentence) if found else finding)
    return out
