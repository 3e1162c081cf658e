"""BN403's arithmetic: how a BatchNorm's statistics and folded tensors fare in fp16, bf16 or int8.

Every value is computed in float64 (model/folding.py's ``fold_parameters``) and then rounded as
the format would round it; the report keeps the worst channel of each quantity. The functions take
tensors, not modules, so any reader that holds the arrays (an ONNX initializer) can use them.
"""

from __future__ import annotations

import torch

from bn_inspect.model.folding import fold_parameters
from bn_inspect.options import Precision
from bn_inspect.report.folding import MAX_INT8_CHANNEL_ERROR, MAX_RELATIVE_ROUNDING, FoldHeadroom
from bn_inspect.text import Untrusted

FLOAT_FORMATS = {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}
INT8_LEVELS = 127


def layer_headrooms(
    layer: Untrusted,
    precision: Precision,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> list[FoldHeadroom]:
    """BN403 for one BatchNorm from its tensors alone: the worst channel of each quantity that fires.

    ``weight`` and ``bias`` are the producer's (a Conv's or Linear's, output channels in dim 0);
    ``weight`` None is a BatchNorm that does not fold, judged as it runs on its own: running_var,
    scale and shift. fp16/bf16: running_var, scale and the folded weight (each channel's largest)
    by float_headroom, the folded bias (or shift) by its overflow alone; int8: the folded weight
    by int8_headroom (an unfolded BatchNorm has none).
    """
    folded_weight, folded_bias, scale = fold_parameters(
        weight if weight is not None else torch.ones(running_mean.numel(), 1),
        bias,
        norm_weight,
        norm_bias,
        running_mean,
        running_var,
        eps,
    )
    if precision is Precision.INT8:
        found = [int8_headroom(layer, folded_weight)] if weight is not None else []
    else:
        found = [
            float_headroom(layer, "running_var", running_var, precision),
            float_headroom(layer, "scale", scale, precision),
            float_headroom(layer, "folded weight", channel_largest(folded_weight), precision)
            if weight is not None
            else None,
            _overflow_only(
                float_headroom(
                    layer,
                    "folded bias" if weight is not None else "shift (bias - running_mean * scale)",
                    folded_bias,
                    precision,
                )
            ),
        ]
    return [room for room in found if room is not None]


def _overflow_only(room: FoldHeadroom | None) -> FoldHeadroom | None:
    # A bias near 0 rounded coarsely moves the output by next to nothing: only its overflow counts.
    return room if room is not None and room.problem == "overflow" else None


def float_headroom(layer: Untrusted, quantity: str, values: torch.Tensor, precision: Precision) -> FoldHeadroom | None:
    """The worst channel of ``values`` (one per channel) rounded to a float format, or None if all fit.

    An overflow (finite in float64, inf in the format) outranks a value that becomes 0, which
    outranks a rounding error above MAX_RELATIVE_ROUNDING of the value.
    """
    exact = values.double().flatten()
    rounded = exact.to(FLOAT_FORMATS[precision]).double()
    finite = torch.isfinite(exact)
    with torch.no_grad():
        relative = ((rounded - exact).abs() / exact.abs()).nan_to_num(nan=0.0, posinf=1.0)
    for problem, bad, order in (
        ("overflow", finite & torch.isinf(rounded), -exact.abs()),
        ("zero", finite & (exact != 0) & (rounded == 0), exact.abs()),
        ("precision", finite & torch.isfinite(rounded) & (relative > MAX_RELATIVE_ROUNDING), -relative),
    ):
        if bool(bad.any()):
            channel = int(torch.where(bad, order, torch.inf).argmin())
            return FoldHeadroom(
                layer,
                quantity,
                problem,
                channel,
                float(exact[channel]),
                float(rounded[channel]),
                float(relative[channel]),
                int(exact.numel()),
            )
    return None


def int8_headroom(layer: Untrusted, folded_weight: torch.Tensor) -> FoldHeadroom | None:
    """The channel of a folded weight that one symmetric int8 scale for the whole tensor serves worst.

    The scale is ``s = max|W'| / 127``; a channel whose largest |W'| is ``m`` is rounded by up to
    ``s / 2``, ``s / (2 m)`` of itself, and rounds to zero entirely when ``m < s / 2``. None when
    every channel stays within MAX_INT8_CHANNEL_ERROR.
    """
    per_channel = folded_weight.double().abs().reshape(folded_weight.shape[0], -1).amax(dim=1)
    largest = float(per_channel.max()) if per_channel.numel() else 0.0
    if not largest > 0 or not torch.isfinite(per_channel).all():
        return None
    step = largest / INT8_LEVELS
    error = (step / 2) / per_channel
    channel = int(error.argmax())
    worst = float(per_channel[channel])
    setter = int(per_channel.argmax())
    if worst < step / 2:
        return FoldHeadroom(
            layer, "folded weight", "zero", channel, worst, 0.0, 1.0, int(per_channel.numel()), setter, largest
        )
    if float(error[channel]) <= MAX_INT8_CHANNEL_ERROR:
        return None
    rounded = round(worst / step) * step
    return FoldHeadroom(
        layer,
        "folded weight",
        "precision",
        channel,
        worst,
        rounded,
        float(error[channel]),
        int(per_channel.numel()),
        setter,
        largest,
    )


def channel_largest(folded_weight: torch.Tensor) -> torch.Tensor:
    """Each output channel's largest |W'| (its scale, which the float rules judge), sign kept away."""
    return folded_weight.double().abs().reshape(folded_weight.shape[0], -1).amax(dim=1)
