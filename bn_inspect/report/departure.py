"""The one departure score: how far a layer's data sits from the running statistics it normalizes with.

Per channel c, the 2-Wasserstein distance between the data's Gaussian N(batch_mean, batch_var + eps)
and the stored one N(running_mean, running_var + eps), in running standard deviations:

    distance[c] = sqrt((batch_mean - running_mean)^2 + (batch_std - running_std)^2) / running_std

It weighs the mean and the variance together: a mean shift of z running stds gives |z|, a variance
ratio r gives |sqrt(r) - 1| (so a collapsed variance counts 1, an inflated one without limit). The
batch variance is the biased one, what BatchNorm normalizes with in training.

A layer's score is the mean distance over its channels divided by the allowance for the data it saw,

    allowance = 0.1 + 3 / sqrt(samples)

where ``samples`` is the number of samples behind each statistic (values per channel over the
values one sample gives a channel: pixels of one image move together, so they count once). The
first term is the drift a healthy model's statistics keep from its own data (the exponential
average of the last training batches); the second is sampling noise, heavy tails included. Both
and the tiers below were calibrated on the fault benchmark (benchmarks/faults/): a score of 0.83
is 1.1 times the largest score of a healthy model in its calibration half over four seeds, and
on the held-out half it warned on 119 of 122 faults that cost 3 or more points of accuracy and on
none of 52 healthy models. A model's score is its worst layer's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bn_inspect.report.records import LayerReport

ALLOWANCE_DRIFT = 0.1
ALLOWANCE_NOISE = 3.0

ERROR = "error"
WARNING = "warning"
INFO = "info"
WITHIN = "within"


@dataclass(frozen=True)
class Thresholds:
    """Limits the data rules use; pyproject.toml's [tool.bn-inspect] and flags override them.

    Attributes:
        warning: a layer whose departure score reaches this departs (check's BN201 warning).
        error: a departure score from here on is an error (BN201 error).
        info: from here on a departure is worth a note, not an alarm.
        min_values: fewer values per channel per batch than this is too noisy (BN203).
        strict: untrained statistics (BN104) are an error, not a warning.
    """

    warning: float = 0.83
    error: float = 1.7
    info: float = 0.5
    min_values: int = 16
    strict: bool = False

    def tier(self, score: float) -> str:
        """``error``, ``warning``, ``info`` or ``within`` for a layer score (NaN is an error)."""
        if math.isnan(score) or score >= self.error:
            return ERROR
        if score >= self.warning:
            return WARNING
        return INFO if score >= self.info else WITHIN

    def departure_limits(self) -> str:
        """When a layer departs, as one phrase."""
        return f"departure score {self.warning:g} warns, {self.error:g} is an error"


def allowance(samples: int) -> float:
    """The mean distance a healthy layer may show on ``samples`` samples (see the module's text)."""
    return ALLOWANCE_DRIFT + ALLOWANCE_NOISE / math.sqrt(samples)


def channel_distances(
    batch_mean: Sequence[float],
    batch_var: Sequence[float],
    running_mean: Sequence[float],
    running_var: Sequence[float],
    eps: float,
) -> tuple[float, ...]:
    """The 2-Wasserstein distance per channel in running standard deviations (NaN where undefined)."""
    out = []
    for bm, bv, rm, rv in zip(batch_mean, batch_var, running_mean, running_var, strict=True):
        if not (bv + eps >= 0 and rv + eps > 0):
            out.append(math.inf if rv + eps == 0 and bv + eps > 0 else math.nan)
            continue
        running_std = math.sqrt(rv + eps)
        out.append(math.hypot(bm - rm, math.sqrt(bv + eps) - running_std) / running_std)
    return tuple(out)


def samples_behind(layer: LayerReport) -> int | None:
    """How many samples each of the layer's statistics was computed over, or None when unknown."""
    if layer.values_per_channel is None or layer.input_shape is None or layer.reduced_axes is None:
        return None
    per_sample = math.prod(layer.input_shape[d] for d in layer.reduced_axes if d != 0)
    return layer.values_per_channel // per_sample if per_sample else None


@dataclass(frozen=True)
class Departure:
    """How far one layer call's data departs from its running statistics.

    Attributes:
        score: the mean distance over channels divided by the allowance (inf or NaN when a channel's is).
        tier: ``error``, ``warning``, ``info`` or ``within`` by ``limits``.
        mean_distance: the mean over channels of the per-channel distance (running stds).
        allowance: what the layer's sample count allows (``allowance(samples)``).
        samples: the samples behind each statistic.
        channels: the channels whose own distance reaches ``limits.warning`` allowances.
        nonfinite: the channels whose distance is NaN or infinite.
        num_channels: the layer's channel count.
        mean_shift: the average over channels of (batch_mean - running_mean) / running_std (signed).
        std_ratio: the geometric mean over channels of batch_std / running_std.
        limits: the thresholds it was judged by.
    """

    score: float
    tier: str
    mean_distance: float
    allowance: float
    samples: int
    channels: tuple[int, ...]
    nonfinite: tuple[int, ...]
    num_channels: int
    mean_shift: float
    std_ratio: float
    limits: Thresholds

    @property
    def departs(self) -> bool:
        """True when the layer warns or errs."""
        return self.tier in (WARNING, ERROR)

    @property
    def is_nonfinite(self) -> bool:
        """True when some channel's figures are NaN or infinite, so the score cannot be finite."""
        return bool(self.nonfinite)

    @property
    def share(self) -> float:
        """The share of channels that depart on their own."""
        return len(self.channels) / self.num_channels if self.num_channels else 0.0

    def direction(self) -> str:
        """Which way the data moved, as a phrase: the signed mean shift and the spread's ratio."""
        parts = []
        if math.isfinite(self.mean_shift) and abs(self.mean_shift) >= 0.1:
            parts.append(
                f"data means {abs(self.mean_shift):.2g} running std {'above' if self.mean_shift > 0 else 'below'} "
                "the running ones"
            )
        if math.isfinite(self.std_ratio) and abs(math.log(self.std_ratio)) >= math.log(1.1):
            parts.append(f"data spread {self.std_ratio:.2g}x the running one")
        return ", ".join(parts) if parts else "no common direction over channels"

    def describe(self) -> str:
        """The score, its tier, how it arose and in which direction, in one phrase."""
        if self.is_nonfinite:
            return f"{len(self.nonfinite)} of {self.num_channels} channels have a NaN or infinite distance"
        return (
            f"departure {self.score:.3g} ({self._tier_words()}): over its {self.num_channels:,} channels the data's "
            f"means and spreads sit {self.mean_distance:.3g} running std from the running ones on average, where "
            f"{self.samples:,} samples allow {self.allowance:.3g} of noise; {len(self.channels)} of "
            f"{self.num_channels} channels depart on their own; {self.direction()}"
        )

    def _tier_words(self) -> str:
        if self.tier == ERROR:
            return f"error at {self.limits.error:g}"
        if self.tier == WARNING:
            return f"warning at {self.limits.warning:g}"
        return f"below the warning level {self.limits.warning:g}"


def departure(layer: LayerReport, thresholds: Thresholds | None = None) -> Departure | None:
    """How far ``layer``'s data departs from its running statistics; None when it cannot be compared.

    A layer cannot be compared without running statistics, without batch statistics, or when it
    saw no sample.
    """
    stats = (layer.batch_mean, layer.batch_var, layer.running_mean, layer.running_var)
    samples = samples_behind(layer)
    if any(s is None or not s for s in stats) or not samples:
        return None
    batch_mean, batch_var, running_mean, running_var = (s for s in stats if s is not None)
    return measure(batch_mean, batch_var, running_mean, running_var, layer.eps or 0.0, samples, thresholds)


def measure(
    batch_mean: Sequence[float],
    batch_var: Sequence[float],
    running_mean: Sequence[float],
    running_var: Sequence[float],
    eps: float,
    samples: int,
    thresholds: Thresholds | None = None,
) -> Departure:
    """The departure of per-channel statistics over ``samples`` samples (``departure`` for a layer report)."""
    limits = thresholds or Thresholds()
    distances = channel_distances(batch_mean, batch_var, running_mean, running_var, eps)
    room = allowance(samples)
    nonfinite = tuple(c for c, d in enumerate(distances) if not math.isfinite(d))
    mean_distance = math.fsum(distances) / len(distances) if not any(map(math.isnan, distances)) else math.nan
    score = mean_distance / room
    shifts, log_ratios = _directions(batch_mean, batch_var, running_mean, running_var, eps)
    return Departure(
        score=score,
        tier=ERROR if nonfinite else limits.tier(score),
        mean_distance=mean_distance,
        allowance=room,
        samples=samples,
        channels=tuple(c for c, d in enumerate(distances) if math.isfinite(d) and d >= limits.warning * room),
        nonfinite=nonfinite,
        num_channels=len(distances),
        mean_shift=math.fsum(shifts) / len(shifts) if shifts else math.nan,
        std_ratio=math.exp(math.fsum(log_ratios) / len(log_ratios)) if log_ratios else math.nan,
        limits=limits,
    )


def _directions(
    batch_mean: Sequence[float],
    batch_var: Sequence[float],
    running_mean: Sequence[float],
    running_var: Sequence[float],
    eps: float,
) -> tuple[list[float], list[float]]:
    shifts, log_ratios = [], []
    for bm, bv, rm, rv in zip(batch_mean, batch_var, running_mean, running_var, strict=True):
        if all(map(math.isfinite, (bm, bv, rm, rv))) and rv + eps > 0 and bv + eps > 0:
            shifts.append((bm - rm) / math.sqrt(rv + eps))
            log_ratios.append(0.5 * math.log((bv + eps) / (rv + eps)))
    return shifts, log_ratios
