"""What lies behind a layer call's statistics, as plain values: the exact moments a report carries, and the
spread of per-sample means that check's BN205 reads."""

from __future__ import annotations

from dataclasses import dataclass

Floats = tuple[float, ...]


@dataclass(frozen=True)
class LayerMoments:
    """The exact moments (float64) behind a layer call's statistics: what lets reports merge exactly.

    kind "channel" (BatchNorm and relatives): ``count`` values per channel, their ``mean`` and
    centred sum of squares ``m2 = sum((x - mean)**2)``; batch_var = m2 / count. kind "instance"
    (InstanceNorm): ``count`` instances of ``values_per_instance`` values each, and the sums over
    instances of each instance's mean (``mean_sum``) and biased variance (``var_sum``); batch_mean =
    mean_sum / count. ``num_batches`` and ``batch_sizes`` ((samples, batches of that size) pairs, in the order the sizes first came)
    say how the values came.
    """

    kind: str
    count: int
    num_batches: int
    batch_sizes: tuple[tuple[int, int], ...]
    mean: Floats | None = None
    m2: Floats | None = None
    values_per_instance: int | None = None
    mean_sum: Floats | None = None
    var_sum: Floats | None = None


@dataclass(frozen=True)
class SampleSpread:
    """For check's BN205, not in reports: per channel, the biased variance over ``num_samples`` samples
    of each sample's mean of the channel over its spatial values (engine/moments.py)."""

    num_samples: int
    between_var: Floats
