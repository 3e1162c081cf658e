"""The shape of a departure and what it says about its cause: the input (first layer) or the statistics.

Per channel c of a layer, with z[c] the mean shift in running standard deviations (report/shift.py)
and r[c] = sqrt(batch_var / running_var) the ratio of the spreads:

* a **common factor**: the log spread ratios ln r[c] agree in sign over at least 90% of the
  channels, and their spread over channels is small against their mean;
* **channel-structured**: they agree in sign but vary between channels as much as a different
  change per input channel makes them vary;
* the first layer is the first normalization layer with running statistics in execution order;
  what the input does shows there first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bn_inspect.report.cause_codes import (
    CHANNEL_ORDER,
    CORRUPTED_LAYER,
    DOMAIN_SHIFT,
    INPUT_NORMALIZATION,
    INPUT_SCALE,
    MOMENTUM,
    SMALL_BATCH_TRAINING,
    SPOILED_STATISTICS,
    STALE_STATISTICS,
    UNKNOWN,
    Cause,
)
from bn_inspect.report.records import IN_MEMORY_FORMAT, LayerReport, Report
from bn_inspect.report.small_batch import first_layer_departure

# BN105's limit: from here on a momentum weights each batch as much as everything before it.
MOMENTUM_NEAR_1 = 0.5
# Formats whose modules keep the momentum they trained with; weights loaded into --arch take the
# architecture's, which says nothing about training.
MOMENTUM_SAVED_WITH = ("torchscript", "pickle", IN_MEMORY_FORMAT)

# A spread ratio of 8 or more (1/8 or less) is a scale mistake (x255, x16, x100 units); the
# standard deviations of normalization lie within it.
SCALE_FACTOR = 8.0
# Below a factor of 1.5 a common change of the spread is what a content change also makes.
NORMALIZATION_FACTOR = 1.5
# Channels whose log spread ratio agrees in sign: a direction, not noise.
COHERENT_SHARE = 0.9
# Spread over channels of ln r against |mean ln r|: below this one common factor, above the other a
# channel-structured change.
COMMON_SPREAD = 0.2
STRUCTURED_SPREAD = 0.25
# A layer counts as untouched by the fault when its mean |z| and |mean ln r| stay below these.
QUIET_SHIFT = 0.2
QUIET_LOG_RATIO = 0.15
# A departure is a few channels' when at most a tenth of them make this share of its size (|z| + |ln r|).
CONCENTRATED = 0.8
# num_batches_tracked at or below this: statistics from a short pass (a recalibration, or too few batches).
FEW_BATCHES = 100
# Input channel counts where channel order is a thing people get wrong (RGB, RGBA).
COLOUR_CHANNELS = (3, 4)
# The order test compares every channel with every other: only for feature layers of modest width.
MAX_ORDER_CHANNELS = 512
# A reorder: most of the features the moved ones match were moved themselves (a unit change matches
# unmoved features, if any).
REORDER_CLOSED = 0.5


@dataclass(frozen=True)
class LayerPattern:
    """The shape of one layer call's departure, over the channels whose figures are finite.

    Attributes:
        layer: the layer call.
        mean_shift: the average signed z over channels.
        abs_shift: the average |z| over channels.
        log_ratio: the average ln r over channels.
        ratio_spread: the standard deviation of ln r over channels.
        share_wider: the share of channels whose batch spread exceeds the running one.
        num_channels: the channels the figures are over.
    """

    layer: LayerReport
    mean_shift: float
    abs_shift: float
    log_ratio: float
    ratio_spread: float
    share_wider: float
    num_channels: int

    @property
    def factor(self) -> float:
        """The common spread ratio, exp(mean ln r)."""
        return math.exp(self.log_ratio)

    @property
    def is_coherent(self) -> bool:
        """The spread moved the same way in at least COHERENT_SHARE of the channels."""
        return max(self.share_wider, 1 - self.share_wider) >= COHERENT_SHARE

    @property
    def relative_spread(self) -> float:
        """How much ln r varies over channels against its mean."""
        return self.ratio_spread / abs(self.log_ratio) if self.log_ratio else math.inf

    @property
    def is_quiet(self) -> bool:
        """The layer's data sits where its statistics say."""
        return self.abs_shift < QUIET_SHIFT and abs(self.log_ratio) < QUIET_LOG_RATIO

    def agreeing(self) -> str:
        """How many channels share the spread's direction, as a phrase ("all 16 channels", "15 of 16 channels")."""
        count = round((self.share_wider if self.log_ratio > 0 else 1 - self.share_wider) * self.num_channels)
        return f"all {count} channels" if count == self.num_channels else f"{count} of {self.num_channels} channels"

    def direction(self) -> str:
        """The spread's common direction, as a phrase."""
        if abs(self.log_ratio) < math.log(1.1):
            return "about the same spread"
        return f"{self.factor:.2g}x the spread" if self.factor >= 1 else f"{1 / self.factor:.2g}x less spread"


def layer_pattern(layer: LayerReport) -> LayerPattern | None:
    """The shape of ``layer``'s departure, or None without batch and running statistics."""
    shifts, ratios = layer.mean_shift_z, layer.var_ratio
    if shifts is None or ratios is None:
        return None
    pairs = [
        (z, 0.5 * math.log(r)) for z, r in zip(shifts, ratios, strict=True) if math.isfinite(z) and 0 < r < math.inf
    ]
    if not pairs:
        return None
    logs = [lr for _, lr in pairs]
    mean_log = math.fsum(logs) / len(logs)
    return LayerPattern(
        layer=layer,
        mean_shift=math.fsum(z for z, _ in pairs) / len(pairs),
        abs_shift=math.fsum(abs(z) for z, _ in pairs) / len(pairs),
        log_ratio=mean_log,
        ratio_spread=math.sqrt(math.fsum((lr - mean_log) ** 2 for lr in logs) / len(logs)),
        share_wider=sum(lr > 0 for lr in logs) / len(logs),
        num_channels=len(pairs),
    )


def _named(layer: LayerReport) -> str:
    return layer.label.raw


def shape_cause(report: Report, stats: Sequence[LayerReport], layer: LayerReport) -> Cause | None:
    """What the first departing layer's pattern says: the input (first layer) or the statistics (deeper)."""
    pattern = layer_pattern(layer)
    if pattern is None:
        return None
    below_eps = _variances_below_eps(layer)
    if below_eps:
        return Cause(
            CORRUPTED_LAYER,
            f"{_named(layer)} stores running variances below eps/10 in {below_eps} of its {len(layer.running_var or ())} "
            "channels, where BatchNorm's own eps dwarfs them: its stored statistics are off (overwritten, or "
            "computed on constant data), whatever the input does",
        )
    if layer is not stats[0]:
        momentum = layer.momentum if report.model.format.raw in MOMENTUM_SAVED_WITH else None
        previous = stats[next(i for i, other in enumerate(stats) if other is layer) - 1]
        return _deep_cause(previous, pattern, stats[0], momentum)
    return _input_cause(report, pattern)


def _variances_below_eps(layer: LayerReport) -> int:
    """How many channels store a running variance below eps/10, when that is most of them; else 0."""
    eps, variances = layer.eps or 0.0, layer.running_var or ()
    count = sum(0 <= v < eps / 10 for v in variances)
    return count if variances and count >= COHERENT_SHARE * len(variances) else 0


def _concentrated(pattern: LayerPattern) -> tuple[int, ...]:
    """The few channels (at most a tenth, at least one) that make CONCENTRATED of the layer's departure, if any."""
    shifts, ratios = pattern.layer.mean_shift_z or (), pattern.layer.var_ratio or ()
    sizes = [
        abs(z) + abs(0.5 * math.log(r)) if math.isfinite(z) and 0 < r < math.inf else math.inf
        for z, r in zip(shifts, ratios, strict=True)
    ]
    total = math.fsum(size for size in sizes if math.isfinite(size))
    ranked = sorted(range(len(sizes)), key=lambda c: -sizes[c])
    limit = max(1, len(sizes) // 10)
    top = ranked[:limit]
    if not total or any(not math.isfinite(sizes[c]) for c in top):
        return ()
    picked: list[int] = []
    for channel in top:
        picked.append(channel)
        if math.fsum(sizes[c] for c in picked) >= CONCENTRATED * total:
            return tuple(sorted(picked))
    return ()


def _deep_cause(
    previous: LayerReport, pattern: LayerPattern, first: LayerReport, momentum: float | None
) -> Cause | None:
    """A departure that starts past the first layer: in the statistics, not in the input."""
    name, before = _named(pattern.layer), layer_pattern(previous)
    shifted = abs(pattern.mean_shift) >= 1 and abs(pattern.mean_shift) >= 0.9 * pattern.abs_shift
    rescaled = pattern.is_coherent and abs(pattern.log_ratio) >= math.log(2) and pattern.relative_spread < COMMON_SPREAD
    if before is not None and before.is_quiet and (shifted or rescaled):
        moved = f"means moved {pattern.mean_shift:+.2g} running std" if shifted else pattern.direction()
        return Cause(
            CORRUPTED_LAYER,
            f"every channel of {name} departs alike ({moved}) while {_named(previous)} just before it "
            f"matches the data: {name}'s own stored statistics are off",
        )
    few = _concentrated(pattern) if before is not None and before.is_quiet else ()
    if few:
        return Cause(
            CORRUPTED_LAYER,
            f"channel{'s' if len(few) > 1 else ''} {_listed(list(few))} of {name} make{'' if len(few) > 1 else 's'} most of "
            f"its departure while its "
            f"other {pattern.num_channels - len(few)} channels and {_named(previous)} just before it match the data: "
            "those channels' stored statistics are off",
        )
    where = f"{name}, past the first layer, which does not depart"
    if pattern.abs_shift >= 0.3 and pattern.is_coherent:
        return None
    if not pattern.is_coherent or abs(pattern.log_ratio) < math.log(1.1):
        how = "depart in no common direction" if not pattern.is_coherent else "keep their spread within 10%"
        seen = (
            f"the channels of {where}, {how} ({pattern.share_wider:.0%} wider, {1 - pattern.share_wider:.0%} narrower, "
            f"means moved {pattern.mean_shift:+.2g} running std on average)"
        )
        if momentum is not None and 0 < momentum < MOMENTUM_NEAR_1:
            return Cause(
                UNKNOWN,
                f"{seen}: as noisy as one batch's statistics, but the layer's momentum is {momentum:g}; the weights "
                "may have moved after the statistics were recorded (fine-tuning with BatchNorm frozen), or the data differs",
            )
        return Cause(MOMENTUM, f"{seen}: running statistics as noisy as one batch's, what a momentum near 1 leaves")
    first_departure = first_layer_departure([first])
    if pattern.log_ratio > 0 and first_departure is not None:
        return Cause(
            UNKNOWN,
            f"the data's spread is {pattern.factor:.2g}x the running one in {pattern.agreeing()} of {name}, and the "
            f"first layer's data departs too, if less (score {first_departure:.2g}): running variances from tiny "
            "batches and data that varies more between samples than the training data's look alike here",
        )
    if pattern.log_ratio > 0:
        return Cause(
            SMALL_BATCH_TRAINING,
            f"the data's spread is {pattern.factor:.2g}x the running one in {pattern.agreeing()} of "
            f"{where}: running variances from tiny batches underestimate the spread",
        )
    return Cause(
        STALE_STATISTICS,
        f"the data's spread is {1 / pattern.factor:.2g}x below the running one in {pattern.agreeing()} "
        f"of {where}, with the means in place: the statistics were recorded for other weights",
    )


def _input_cause(report: Report, pattern: LayerPattern) -> Cause | None:
    """A departure that starts at the first layer: what the input pattern says."""
    layer, name = pattern.layer, _named(pattern.layer)
    on_input = layer.input_shape is not None and tuple(layer.input_shape[1:]) == tuple(report.input.shape[1:])
    found = _feature_cause(layer) if on_input else None
    if found is not None:
        return found
    every = f"{pattern.agreeing()} of the first layer, {name},"
    if pattern.is_coherent and abs(pattern.log_ratio) >= math.log(SCALE_FACTOR):
        return Cause(
            INPUT_SCALE,
            f"{every} have {pattern.direction()} (means off by {pattern.abs_shift:.2g} running std on average): the input's "
            "scale differs from training's (pixels 0-255 where 0-1 was trained, or a missing /255)",
        )
    if pattern.is_coherent and abs(pattern.log_ratio) >= math.log(NORMALIZATION_FACTOR):
        if pattern.relative_spread < COMMON_SPREAD:
            return Cause(
                INPUT_NORMALIZATION,
                f"{every} have {pattern.direction()}, one common factor: the input's normalization "
                "differs from training's (a missing or different mean/std)",
            )
        channels = report.input.shape[1] if len(report.input.shape) == 4 else 0
        if pattern.relative_spread >= STRUCTURED_SPREAD and channels in COLOUR_CHANNELS:
            return Cause(
                CHANNEL_ORDER,
                f"{every} have {pattern.direction()}, by a factor that varies from channel to channel "
                f"(a change per input channel, {channels} of them): the input's channels are in another "
                "order than in training (BGR for RGB)",
            )
        return None
    return _content_cause(pattern)


def _content_cause(pattern: LayerPattern) -> Cause:
    """The first layer departs without a scale, normalization or order pattern: the content differs."""
    layer, name = pattern.layer, _named(pattern.layer)
    count = layer.num_batches_tracked
    if count and count <= FEW_BATCHES:
        return Cause(
            SPOILED_STATISTICS,
            f"the first layer, {name}, departs (means off by {pattern.abs_shift:.2g} running std on average) from "
            f"statistics made in only {count:,} batches: they were estimated on data unlike this (a "
            "recalibration or short fine-tune on other data, or an evaluation loop left in train mode), or "
            "this data comes from another domain",
        )
    return Cause(
        DOMAIN_SHIFT,
        f"the first layer, {name}, departs without a common scale or order (means off by "
        f"{pattern.abs_shift:.2g} running std on average, {pattern.direction()}): the data's content differs "
        "from what the statistics describe (another domain or sensor, crop, resize or decoding)",
    )


def _feature_cause(layer: LayerReport) -> Cause | None:
    """A layer on the model's input itself (features as channels): standardized, rescaled or reordered."""
    name = _named(layer)
    bm, bv = layer.batch_mean or (), layer.batch_var or ()
    rm, rv = layer.running_mean or (), layer.running_var or ()
    standard = [abs(m) < 0.05 and abs(v - 1) < 0.05 for m, v in zip(bm, bv, strict=True)]
    stored_standard = [abs(m) < 0.05 and abs(v - 1) < 0.05 for m, v in zip(rm, rv, strict=True)]
    if standard and sum(standard) >= COHERENT_SHARE * len(standard) and sum(stored_standard) < len(standard) / 2:
        return Cause(
            INPUT_NORMALIZATION,
            f"{sum(standard)} of the {len(standard)} features reaching {name} have mean 0 and variance 1 "
            "while its running statistics are in raw units: the input was standardized for a model that "
            "standardizes itself",
        )
    # A reorder first: columns swapped between features whose spread follows their mean also look rescaled.
    reordered = _order_cause(layer)
    if reordered is not None:
        return reordered
    rescaled = [c for c in range(len(bm)) if _rescaled(bm[c], bv[c], rm[c], rv[c])]
    if not rescaled:
        return None
    factor = math.sqrt(bv[rescaled[0]] / rv[rescaled[0]])
    return Cause(
        INPUT_SCALE,
        f"features {_listed(rescaled)} reaching {name} carry about {factor:.3g}x their running mean "
        "and spread: those features are in other units than in training",
    )


def _rescaled(bm: float, bv: float, rm: float, rv: float) -> bool:
    """Mean and spread both scaled by one large factor (a unit change)."""
    if not all(map(math.isfinite, (bm, bv, rm, rv))) or rm == 0 or rv <= 0 or bv <= 0 or bm / rm <= 0:
        return False
    log_spread, log_mean = 0.5 * math.log(bv / rv), math.log(bm / rm)
    return abs(log_spread) >= math.log(SCALE_FACTOR) and abs(log_mean - log_spread) < math.log(NORMALIZATION_FACTOR)


def _order_cause(layer: LayerReport) -> Cause | None:
    """The features match the running statistics of other features far better than their own."""
    bm, bv = layer.batch_mean or (), layer.batch_var or ()
    rm, rv = layer.running_mean or (), layer.running_var or ()
    eps, size = layer.eps or 0.0, len(bm)
    if not 2 <= size <= MAX_ORDER_CHANNELS:
        return None
    own, best, moved, targets = 0.0, 0.0, [], set()
    for c in range(size):
        distances = [_distance(bm[c], bv[c], rm[j], rv[j], eps) for j in range(size)]
        nearest = min(range(size), key=distances.__getitem__)
        own, best = own + distances[c], best + distances[nearest]
        if nearest != c and distances[nearest] < 0.5 * distances[c]:
            moved.append(c)
            targets.add(nearest)
    # A reorder moves features among themselves: the features they match are the moved ones.
    closed = len(targets & set(moved)) > REORDER_CLOSED * len(moved)
    if len(moved) >= 2 and closed and best < 0.5 * own:
        return Cause(
            CHANNEL_ORDER,
            f"features {_listed(moved)} reaching {_named(layer)} match other features' running statistics "
            f"far better than their own ({best / size:.2g} against {own / size:.2g} running std): the columns "
            "are in another order than in training",
        )
    return None


def _distance(bm: float, bv: float, rm: float, rv: float, eps: float) -> float:
    if not all(map(math.isfinite, (bm, bv, rm, rv))) or rv + eps <= 0 or bv + eps < 0:
        return math.inf
    return math.hypot(bm - rm, math.sqrt(bv + eps) - math.sqrt(rv + eps)) / math.sqrt(rv + eps)


def _listed(channels: Sequence[int], limit: int = 6) -> str:
    shown = ", ".join(str(c) for c in channels[:limit])
    return shown + (f" and {len(channels) - limit} more" if len(channels) > limit else "")
