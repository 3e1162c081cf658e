"""BN403's arithmetic: how a BatchNorm's statistics and folded tensors fare in fp16, bf16 or int8.

Every value is computed in float64 (model/folding.py's ``fold_parameters``) and then rounded as
the format would round it; the report keeps the worst channel of each quantity. The functions take
tensors, not modules, so any reader that holds the arrays (an ONNX initializer) can use them.
"""

from __future__ import annotations

import torch

from bn_inspect.options import Precision
from bn_inspect.report.folding import MAX_INT8_CHANNEL_ERROR, MAX_RELATIVE_ROUNDING, FoldHeadroom
from bn_inspect.text import Untrusted

FLOAT_FORMATS = {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}
INT8_LEVELS = 127


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
    if worst < step / 2:
        return FoldHeadroom(layer, "folded weight", "zero", channel, worst, 0.0, 1.0, int(per_channel.numel()))
    if float(error[channel]) <= MAX_INT8_CHANNEL_ERROR:
        return None
    rounded = round(worst / step) * step
    return FoldHeadroom(
        layer, "folded weight", "precision", channel, worst, rounded, float(error[channel]), int(per_channel.numel())
    )


def channel_largest(folded_weight: torch.Tensor) -> torch.Tensor:
    """Each output channel's largest |W'| (its scale, which the float rules judge), sign kept away."""
    return folded_weight.double().abs().reshape(folded_weight.shape[0], -1).amax(dim=1)
