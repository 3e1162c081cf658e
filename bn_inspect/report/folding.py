"""The folding rules BN401-BN404: where each BatchNorm would fold, what folding costs in a number format (plain values).

Folding BatchNorm into the convolution or linear layer before it (what exporters and deployment
compilers do in eval mode) replaces that layer's weight and bias with

    scale = weight / sqrt(running_var + eps)
    W' = W * scale    (per output channel)
    b' = (b - running_mean) * scale + bias

The records here say which BatchNorm folds into what (``FoldSite``), how the statistics and the
folded tensors fare in a deployment format (``FoldHeadroom``) and how much folding changed an output
on real data (``FoldChange``); the functions turn them into findings. No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bn_inspect.report.findings import RULES, Finding, Severity
from bn_inspect.text import Untrusted

# BN403: a statistic or folded value whose rounding in the format moves it by more than this
# share of itself. Twice bfloat16's worst rounding of a normal number (2**-8, 0.39%) and twenty
# times float16's (2**-11): only values pushed below the format's normal range fire.
MAX_RELATIVE_ROUNDING = 0.01
# BN403 with int8 (one symmetric scale per tensor, 127 levels each side): a channel whose largest
# folded weight is rounded by more than this share of itself spans fewer than 10 of the 127 levels,
# because another channel's weights set the scale.
MAX_INT8_CHANNEL_ERROR = 0.05
# BN404: the root mean square of an output's change as a share of the output's own root mean
# square, beyond which folding is a finding: for the model's output and for a folded layer's. On the
# four sample models (docs/folding.md) the healthy maxima over fp16, bf16 and int8 were 0.0104
# (model) and 0.0284 (layer); a single running_var of 1e-8 in the last BatchNorm took the int8
# model output to 0.043-0.12 on three of them.
MAX_OUTPUT_CHANGE = 0.02
MAX_LAYER_CHANGE = 0.05


@dataclass(frozen=True)
class FoldSite:
    """One BatchNorm module and what comes directly before it in the traced graph.

    ``producer`` is the module the BatchNorm's input comes from (None when it is not a module: an
    add, a concat, a function, the model's input); ``producer_kind`` names it as a person would
    ("Conv2d", "ReLU", "add", "the model's input"). ``is_foldable``: a Conv or Linear whose output
    only this BatchNorm reads, with matching channels; otherwise ``reason`` says why not.
    ``bias_max`` is the largest |bias| of a foldable producer that has one (BN401), else None.
    """

    layer: Untrusted
    producer: Untrusted | None
    producer_kind: str
    is_foldable: bool
    reason: str | None = None
    bias_max: float | None = None


@dataclass(frozen=True)
class FoldHeadroom:
    """The worst channel of one quantity of one layer in a deployment format (BN403).

    ``quantity``: running_var, scale (weight / sqrt(running_var + eps)), folded weight or folded bias.
    ``problem``: "overflow" (beyond the format's largest finite value), "zero" (rounds to zero),
    "precision" (rounding moves it by ``relative_error`` of itself, above the rule's limit).
    ``value`` is the float64 value of the worst channel, ``rounded`` what the format makes of it.
    In int8, ``scale_channel`` is the channel whose largest |folded weight|, ``scale_value``, sets
    the tensor's one scale (the cause, where the worst channel is the victim).
    """

    layer: Untrusted
    quantity: str
    problem: str
    channel: int
    value: float
    rounded: float
    relative_error: float
    num_channels: int
    scale_channel: int | None = None
    scale_value: float | None = None


@dataclass(frozen=True)
class FoldChange:
    """How much folding changed one output on one batch (BN404).

    ``layer`` is the folded BatchNorm (its producer's output in the folded model), None for the
    model's output. ``change`` is the root mean square of folded - original over the output's
    elements as a share of the original output's root mean square (``scale``); ``format`` is
    "float32" or the --precision format.
    """

    layer: Untrusted | None
    format: str
    change: float
    scale: float


def _finding(code: str, layer: Untrusted | None, message: str, severity: Severity | None = None) -> Finding:
    rule = RULES[code]
    return Finding(code, rule.name, severity or rule.severity, layer, 0 if layer is not None else None, (), message)


def site_findings(sites: Sequence[FoldSite], *, deploys: bool) -> list[Finding]:
    """BN401 (a bias before a foldable BatchNorm) and BN402 (a BatchNorm that cannot fold).

    Args:
        deploys: a deployment format was named (--precision): an unfoldable BatchNorm stays a
            separate operation there, so BN402 is a warning.
    """
    out: list[Finding] = []
    for site in sites:
        producer = site.producer if site.producer is not None else site.producer_kind
        if site.is_foldable and site.bias_max is not None:
            out.append(
                _finding(
                    "BN401",
                    site.layer,
                    f"{producer} ({site.producer_kind}) has a bias (largest |bias| {site.bias_max:.3g}) and "
                    "only this BatchNorm reads its output: BatchNorm subtracts the mean, so the bias changes "
                    "nothing in training and is absorbed when folding. Build it with bias=False",
                )
            )
        if not site.is_foldable:
            out.append(
                _finding(
                    "BN402",
                    site.layer,
                    f"cannot be folded: {site.reason}. It stays a separate normalization at deployment "
                    "(an extra pass over the activation, in the deployment format's precision)",
                    Severity.WARNING if deploys else None,
                )
            )
    return out


_PROBLEM_RANK = {"overflow": 0, "zero": 1, "precision": 2}


def headroom_findings(headrooms: Sequence[FoldHeadroom], precision: str) -> list[Finding]:
    """BN403: one finding per layer, on its worst quantity's worst channel (an overflow, then a
    value that becomes 0, then the largest rounding), naming the layer's other quantities that
    fire; an overflow is an error."""
    by_layer: dict[str, list[FoldHeadroom]] = {}
    for room in headrooms:
        by_layer.setdefault(room.layer.raw, []).append(room)
    out: list[Finding] = []
    for rooms in by_layer.values():
        rooms = sorted(rooms, key=lambda room: _PROBLEM_RANK[room.problem])
        room, others = rooms[0], rooms[1:]
        also = f" Also: {', '.join(f'{other.quantity} ({other.problem})' for other in others)}." if others else ""
        out.append(
            _finding(
                "BN403",
                room.layer,
                f"{_said(room, precision)}.{also} {_fix(room)}",
                Severity.ERROR if room.problem == "overflow" else None,
            )
        )
    return out


def _said(room: FoldHeadroom, precision: str) -> str:
    where = f"{room.quantity} of channel {room.channel}"
    if precision == "int8":
        where = f"channel {room.channel}'s largest |folded weight|, {room.value:.3g},"
        scale = "one scale for the whole tensor" + (
            f", set by channel {room.scale_channel}'s largest |folded weight|, {room.scale_value:.3g}"
            if room.scale_channel is not None and room.scale_value is not None
            else ""
        )
        if room.problem == "zero":
            return f"{where} is below half of int8's step under {scale}: the channel becomes 0"
        return (
            f"{where} spans {0.5 / room.relative_error:.1f} of int8's 127 levels under {scale}: its weights are "
            f"rounded by up to {room.relative_error:.1%} of it"
        )
    if room.problem == "overflow":
        return f"{where} is {room.value:.4g}, beyond {precision}'s largest value: it becomes inf"
    if room.problem == "zero":
        return f"{where} is {room.value:.3g}, below {precision}'s smallest value: it becomes 0"
    return (
        f"{where} is {room.value:.4g}, which {precision} rounds to {room.rounded:.4g} ({room.relative_error:.1%} off)"
    )


def _fix(room: FoldHeadroom) -> str:
    if room.quantity == "folded weight" and room.problem == "precision":
        return (
            "One scale for the whole tensor is set by a channel with far larger folded weights: quantize per "
            "channel, or recalibrate the statistics that make that channel's scale extreme"
        )
    return (
        "A tiny running_var or a huge weight makes the scale weight / sqrt(running_var + eps) extreme: "
        "recalibrate on real data (bn-inspect recalibrate), or keep this layer in float32"
    )


def change_findings(changes: Sequence[FoldChange]) -> list[Finding]:
    """BN404: outputs that folding moved by more than MAX_OUTPUT_CHANGE (the model's) or
    MAX_LAYER_CHANGE (a folded layer's) of their scale; NaN or inf changes always."""
    out: list[Finding] = []
    for change in changes:
        limit = MAX_OUTPUT_CHANGE if change.layer is None else MAX_LAYER_CHANGE
        if change.change <= limit:
            continue
        what = "the model's output" if change.layer is None else "the output of the layer it folds into"
        finite = math.isfinite(change.change)
        moved = (
            f"changes by {change.change:.3g} of its size: the root mean square of the change is {change.change:.3g} "
            f"times the original output's ({change.scale:.3g}); the limit is {limit:g}"
            if finite
            else "becomes NaN or infinite"
        )
        out.append(
            _finding(
                "BN404",
                change.layer,
                f"folded and run in {change.format}, {what} {moved}. "
                "See the BN403 findings, or keep the layers it names unfolded in float32",
                # An output that is no longer a number is broken, however small the model's other changes.
                severity=None if finite else Severity.ERROR,
            )
        )
    return out


def change_summary(changes: Sequence[FoldChange]) -> str | None:
    """One line with the largest change per format, silent or not: the model's output and the worst folded layer."""
    parts = []
    for format in dict.fromkeys(change.format for change in changes):
        mine = [change for change in changes if change.format == format]
        model = next((change.change for change in mine if change.layer is None), None)
        layers = [change for change in mine if change.layer is not None]
        worst = max(
            layers, key=lambda change: change.change if math.isfinite(change.change) else math.inf, default=None
        )
        said = f"folded in {format}, the model's output {_by(model)}" if model is not None else f"folded in {format}"
        if worst is not None:
            said += f", the folded layers {_by(worst.change, 'at most ')} ({worst.layer})"
        parts.append(said)
    if not parts:
        return None
    return (
        f"BN404 on the first batch (each change as a share of its output's scale; limits {MAX_OUTPUT_CHANGE:g} "
        f"for the model's output, {MAX_LAYER_CHANGE:g} for a layer): {'; '.join(parts)}"
    )


def _by(change: float, bound: str = "") -> str:
    return f"moved {bound}{change:.2g}" if math.isfinite(change) else "became NaN or infinite"
