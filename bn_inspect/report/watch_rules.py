"""The watch's events (BN501-BN506): what a sample or a step shows, judged on plain values.

Each event fires once per layer (BN506 once for a momentum of at least LARGE_MOMENTUM, and once
per stretch of lagging samples), at the step where it was seen; the rule table
(report/findings.py) holds the codes, names and severities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from bn_inspect.report.departure import Thresholds
from bn_inspect.report.findings import RULES
from bn_inspect.report.watch_records import CallSummary, WatchEvent

# BN506: a layer lags when its departure stays at the warning tier at this many consecutive
# samples spanning at least LAG_MIN_STEPS steps: ten averaging times of the default momentum 0.1,
# so the first steps (running statistics still near 0 and 1) and one odd batch never fire.
LAG_SAMPLES = 5
LAG_MIN_STEPS = 100
# BN506 also names a training-mode layer whose momentum is at least this, as check's BN105 does:
# a sample taken after the update sees running statistics that are mostly the last batch, so no
# departure can show that they follow single batches.
LARGE_MOMENTUM = 0.5


@dataclass
class _Lag:
    first_step: int
    count: int = 0
    reported: bool = False


@dataclass
class WatchRules:
    """The state the events need between samples: what was reported, and each layer's lagging stretch."""

    thresholds: Thresholds = field(default_factory=Thresholds)
    rank: int = 0
    reported: set[tuple[str, str | None]] = field(default_factory=set)
    lags: dict[str, _Lag] = field(default_factory=dict)

    def _event(self, step: int, code: str, layer: str | None, message: str, **values: float | int | str) -> WatchEvent:
        self.reported.add((code, layer))
        return WatchEvent(step, code, RULES[code].severity.value, layer, message, values, self.rank)

    def _new(self, code: str, layer: str | None) -> bool:
        return (code, layer) not in self.reported

    def nonfinite(
        self, step: int, layer: str, tensors: Sequence[str], follows_input: bool = False
    ) -> WatchEvent | None:
        """BN501 at the first step and first layer (execution order) holding a NaN or infinity; once per run.

        ``follows_input``: the layer's running statistics are updated from its input (training mode,
        momentum above 0), so its input is not checked apart and a NaN found in them may have come
        from the input as much as from the buffers themselves.
        """
        if any(code == "BN501" for code, _ in self.reported):
            return None
        where = f"{layer} ({', '.join(tensors)})" if tensors else f"{layer} (its input)"
        if follows_input and {"running_mean", "running_var"} & set(tensors):
            where = (
                f"{layer}'s {', '.join(tensors)} (updated from the step's input: a non-finite input or an "
                "upstream layer)"
            )
        return self._event(
            step,
            "BN501",
            layer,
            f"the first non-finite value appeared at step {step} in {where}, the first layer in "
            "execution order to hold one: look at this step's batch, the learning rate and the loss scale",
        )

    def few_values(self, step: int, layer: str, values_per_channel: int) -> WatchEvent | None:
        """BN505 when a training-mode call normalizes with fewer values per channel than ``min_values``."""
        if values_per_channel >= self.thresholds.min_values or not self._new("BN505", layer):
            return None
        return self._event(
            step,
            "BN505",
            layer,
            f"{layer} normalizes with batch statistics over only {values_per_channel:,} values per channel "
            f"(fewer than {self.thresholds.min_values}): use larger batches, SyncBatchNorm across ranks, "
            "or GroupNorm",
            values_per_channel=values_per_channel,
        )

    def rank_divergence(self, step: int, layer: str, max_abs_diff: float, buffer: str) -> WatchEvent | None:
        """BN504 when a layer's running buffer differs across ranks (any difference: DDP's broadcast keeps them equal)."""
        if not (max_abs_diff > 0) or not self._new("BN504", layer):
            return None
        return self._event(
            step,
            "BN504",
            layer,
            f"the ranks hold different {buffer} in {layer} (by up to {max_abs_diff:.4g}): each rank updates its "
            "own running statistics (DDP with broadcast_buffers=False); keep broadcast_buffers=True, use "
            "SyncBatchNorm, or average the buffers before saving",
            max_abs_diff=max_abs_diff,
            buffer=buffer,
        )

    def judge_sample(
        self, step: int, summaries: Sequence[CallSummary], momenta: Mapping[str, float] | None = None
    ) -> list[WatchEvent]:
        """BN502, BN503 and BN506 on one sample's summaries; ``momenta``: each layer's momentum (None: a cumulative average)."""
        events: list[WatchEvent | None] = []
        departures: dict[str, float | None] = {}
        for s in summaries:
            if s.call == 0:
                events.append(self._frozen_statistics(step, s))
                events.append(self._half_frozen(step, s))
                events.append(self._large_momentum(step, s, (momenta or {}).get(s.layer)))
            if s.training and s.has_running:
                best = departures.get(s.layer)
                score = s.departure
                departures[s.layer] = score if best is None or (score is not None and score > best) else best
        for layer, score in departures.items():
            events.append(self._lag(step, layer, score))
        return [e for e in events if e is not None]

    def _frozen_statistics(self, step: int, s: CallSummary) -> WatchEvent | None:
        if not (s.training and s.has_running and not s.buffers_changed) or not self._new("BN502", s.layer):
            return None
        return self._event(
            step,
            "BN502",
            s.layer,
            f"{s.layer} is in training mode but its running statistics have not moved since the last sample "
            "(momentum 0, buffers reset or overwritten each step, or statistics frozen by mistake)",
        )

    def _half_frozen(self, step: int, s: CallSummary) -> WatchEvent | None:
        if not self._new("BN503", s.layer) or not (s.has_running and s.has_affine):
            return None
        if s.training and s.buffers_changed and not s.params_requires_grad:
            return self._event(
                step,
                "BN503",
                s.layer,
                f"{s.layer} has frozen affine parameters (requires_grad False) while its running statistics "
                "keep updating in training mode: put the layer in eval mode too (half-frozen BatchNorm)",
            )
        if not s.training and not s.buffers_changed and s.params_changed:
            return self._event(
                step,
                "BN503",
                s.layer,
                f"{s.layer} is in eval mode (running statistics frozen) while its affine parameters keep "
                "training: the scale and shift learn against statistics that no longer follow the data",
            )
        return None

    def _large_momentum(self, step: int, s: CallSummary, momentum: float | None) -> WatchEvent | None:
        if momentum is None or momentum < LARGE_MOMENTUM or not (s.training and s.has_running):
            return None
        if not self._new("BN506", s.layer):
            return None
        return self._event(
            step,
            "BN506",
            s.layer,
            f"{s.layer} trains with momentum {momentum:g}: each update makes its running statistics "
            f"{momentum:.0%} the current batch, so they follow single batches and eval normalizes with "
            "one batch's noise; PyTorch weights the new batch by momentum where Keras/TF weight the old "
            "statistics (0.99 there is 0.01 here): use 1 - momentum when porting, or 0.1 (the default)",
            momentum=momentum,
        )

    def _lag(self, step: int, layer: str, score: float | None) -> WatchEvent | None:
        if score is None or not math.isfinite(score) or score < self.thresholds.warning:
            self.lags.pop(layer, None)
            return None
        lag = self.lags.setdefault(layer, _Lag(first_step=step))
        lag.count += 1
        steps = step - lag.first_step
        if lag.reported or lag.count < LAG_SAMPLES or steps < LAG_MIN_STEPS:
            return None
        lag.reported = True
        return self._event(
            step,
            "BN506",
            layer,
            f"{layer}'s running statistics have stayed far from its batch statistics for {steps:,} steps "
            f"(departure {score:.3g}, warning at {self.thresholds.warning:g}): the running average lags or "
            "overshoots the data; check the momentum (too small lags, too large follows single batches)",
            departure=score,
            steps=steps,
        )
