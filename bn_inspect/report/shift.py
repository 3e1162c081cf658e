"""The one definition of how far a layer's data sits from its running statistics, and one NaN policy.

Per channel c, from the layer's batch statistics over all values it saw and its stored running ones:

* ``mean_shift_z[c] = (batch_mean[c] - running_mean[c]) / sqrt(running_var[c] + eps)``: how many
  running standard deviations the data's mean sits from the stored mean;
* ``var_ratio[c] = batch_var[c] / running_var[c]``, with the biased batch variance (what
  BatchNorm normalizes with).

NaN policy: a channel whose figure is undefined (0 / 0, a NaN input, a negative running variance)
is NaN, and a summary over channels (max |z|, mean |z|, worst ratio) is NaN when any channel is:
a layer whose data cannot be judged is never reported as healthy. x / 0 for x != 0 is ±inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Floats = tuple[float, ...]


def _div(top: float, bottom: float) -> float:
    if bottom == 0 or math.isnan(bottom):
        return math.nan if top == 0 or math.isnan(top) or math.isnan(bottom) else math.copysign(math.inf, top)
    return top / bottom


def mean_shift_z(
    batch_mean: Sequence[float], running_mean: Sequence[float], running_var: Sequence[float], eps: float
) -> Floats:
    """(batch_mean - running_mean) / sqrt(running_var + eps) per channel."""
    return tuple(
        _div(b - r, math.sqrt(v + eps) if v + eps >= 0 else math.nan)
        for b, r, v in zip(batch_mean, running_mean, running_var, strict=True)
    )


def var_ratio(batch_var: Sequence[float], running_var: Sequence[float]) -> Floats:
    """batch_var / running_var per channel."""
    return tuple(_div(b, r) for b, r in zip(batch_var, running_var, strict=True))


def max_abs(values: Sequence[float] | None) -> float | None:
    """The largest |value| (NaN if any is NaN; None for no values)."""
    if not values:
        return None
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(abs(v) for v in values)


def mean_abs(values: Sequence[float] | None) -> float | None:
    """The average |value| (NaN if any is NaN; None for no values)."""
    if not values:
        return None
    return math.fsum(abs(v) for v in values) / len(values)


def worst_ratio(ratios: Sequence[float] | None) -> float | None:
    """The ratio farthest from 1 on a log scale (NaN if any is NaN; 0 and inf count as farthest)."""
    if not ratios:
        return None
    if any(math.isnan(r) for r in ratios):
        return math.nan
    return max(ratios, key=lambda r: abs(math.log(r)) if 0 < r < math.inf else math.inf)
