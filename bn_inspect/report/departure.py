"""The one definition of when a layer's data departs from its running statistics, and its limits.

A layer call departs when more than ``max_share`` of its channels have ``|mean_shift_z| >
max_shift`` or ``var_ratio`` outside ``[1 / max_var_ratio, max_var_ratio]`` (report/shift.py
defines both), or when a channel's shift z or var ratio is NaN or infinite: following shift.py's
NaN policy, a layer whose data cannot be judged never passes as healthy. check's BN201,
``first_divergent`` and inspect's verdict all ask this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bn_inspect.report import shift

if TYPE_CHECKING:
    from bn_inspect.report.records import LayerReport

SHIFT_Z = "shift z"
VAR_RATIO = "var ratio"
NONFINITE = "NaN or Inf"


@dataclass(frozen=True)
class Thresholds:
    """Limits the data rules use; pyproject.toml's [tool.bn-inspect] and flags override them.

    Attributes:
        max_shift: |mean_shift_z| above this counts as shifted.
        max_var_ratio: var_ratio outside [1/R, R] counts as shifted.
        max_share: BN201 fires when more than this share of a layer's channels is shifted.
        min_values: fewer values per channel per batch than this is too noisy (BN203).
        strict: untrained statistics (BN104) are an error, not a warning.
    """

    max_shift: float = 3.0
    max_var_ratio: float = 4.0
    max_share: float = 0.1
    min_values: int = 16
    strict: bool = False

    def departure_limits(self) -> str:
        """When a layer departs, as one phrase."""
        low, high = 1 / self.max_var_ratio, self.max_var_ratio
        return (
            f"more than {self.max_share:.0%} of its channels with |shift z| > {self.max_shift:g} "
            f"or var ratio outside [{low:.3g}, {high:.3g}]"
        )


@dataclass(frozen=True)
class Departure:
    """How one layer call's data departs from its running statistics.

    Attributes:
        statistics: what tripped, in order: "shift z", "var ratio", or "NaN or Inf" alone.
        channels: the channels past a limit (or with a NaN or infinite figure).
        num_channels: the layer's channel count.
        max_abs_shift_z: the largest finite |shift z| over all channels (None when none is finite).
        worst_var_ratio: the finite var ratio farthest from 1 (None when none is finite).
        limits: the thresholds it was judged by.
    """

    statistics: tuple[str, ...]
    channels: tuple[int, ...]
    num_channels: int
    max_abs_shift_z: float | None
    worst_var_ratio: float | None
    limits: Thresholds

    @property
    def is_nonfinite(self) -> bool:
        """True when the layer departs because its figures are NaN or infinite."""
        return self.statistics == (NONFINITE,)

    @property
    def share(self) -> float:
        """The share of channels that depart."""
        return len(self.channels) / self.num_channels if self.num_channels else 0.0

    def describe(self) -> str:
        """Which statistic tripped, past which limit, at worst how far, in how many channels."""
        count = f"{len(self.channels)} of {self.num_channels} channels ({self.share:.0%})"
        if self.is_nonfinite:
            return f"{count} have a NaN or infinite shift z or var ratio"
        limits = []
        if SHIFT_Z in self.statistics:
            limits.append(f"|shift z| > {self.limits.max_shift:g} (max {_number(self.max_abs_shift_z)})")
        if VAR_RATIO in self.statistics:
            low, high = 1 / self.limits.max_var_ratio, self.limits.max_var_ratio
            limits.append(f"var ratio outside [{low:.3g}, {high:.3g}] (worst {_number(self.worst_var_ratio)})")
        return f"{count} have {' or '.join(limits)}"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def departure(layer: LayerReport, thresholds: Thresholds) -> Departure | None:
    """How ``layer``'s data departs from its running statistics, or None when it does not (or cannot be compared)."""
    shifts, ratios = layer.mean_shift_z, layer.var_ratio
    if not shifts or ratios is None:
        return None
    low, high = 1 / thresholds.max_var_ratio, thresholds.max_var_ratio
    pairs = list(zip(shifts, ratios, strict=True))
    finite = [(c, z, r) for c, (z, r) in enumerate(pairs) if math.isfinite(z) and math.isfinite(r)]
    by_shift = {c for c, z, _ in finite if abs(z) > thresholds.max_shift}
    by_ratio = {c for c, _, r in finite if not low <= r <= high}
    largest = shift.max_abs([z for _, z, _ in finite])
    worst = shift.worst_ratio([r for _, _, r in finite])
    departed = sorted(by_shift | by_ratio)
    if departed and len(departed) / len(pairs) > thresholds.max_share:
        statistics = tuple(name for name, hit in ((SHIFT_Z, by_shift), (VAR_RATIO, by_ratio)) if hit)
        return Departure(statistics, tuple(departed), len(pairs), largest, worst, thresholds)
    nonfinite = tuple(c for c, (z, r) in enumerate(pairs) if not (math.isfinite(z) and math.isfinite(r)))
    if nonfinite:
        return Departure((NONFINITE,), nonfinite, len(pairs), largest, worst, thresholds)
    return None
