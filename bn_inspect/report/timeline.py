"""What `bn-inspect timeline` shows of a watched training run: its events, each layer's departure over the steps.

A timeline file (docs: README "Watching training") is written by ``bn_inspect.watch``; this module
holds what its reader (``report/timeline_reading.py``) keeps of it, as plain values: the events
(check findings with a step), per layer call and rank the departure score and the running
statistics at each sampled training step, and the train/eval gap measured at each validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bn_inspect.options import TimelineFailOn
from bn_inspect.report.departure import Thresholds
from bn_inspect.report.findings import Severity
from bn_inspect.report.records import json_ready
from bn_inspect.text import Untrusted

# The version of the command's JSON document (timeline-output.schema.json), not of the file.
OUTPUT_SCHEMA_VERSION = 1
# The version of the timeline file format this reader knows.
TIMELINE_VERSION = 1
TIMELINE_FORMAT = "bn-inspect-timeline"


@dataclass(frozen=True)
class TimelineEvent:
    """One event of the run (BN501-BN506): where and when the watch found it.

    Attributes:
        step: the training step it was found at.
        rank: the process that found it (0 without torch.distributed).
        code: its rule code, e.g. ``BN501``.
        severity: as the watch judged it.
        layer: the layer it is about, None for the whole model.
        message: one sentence, as the file holds it.
        values: its code-specific figures: numbers (``departure``, ``max_abs_diff``...), None where not
            finite, and names as the file holds them (BN504's ``buffer``).
    """

    step: int
    rank: int
    code: str
    severity: Severity
    layer: Untrusted | None
    message: Untrusted
    values: tuple[tuple[Untrusted, float | Untrusted | None], ...] = ()


@dataclass(frozen=True)
class LayerSeries:
    """One layer call on one rank over the sampled training steps (phase "train").

    Attributes:
        layer: the layer's module name.
        call: 0 for its first call in a step, 1 for its second, ...
        rank: the process whose samples these are.
        steps: the sampled steps, increasing.
        departures: the departure score at each step (mean 2-Wasserstein distance over channels in
            running standard deviations, report/departure.py); None where not finite or not measured.
        running_mean_norms: the L2 norm of the running mean after the step's update.
        running_var_means: the mean over channels of the running variance after the update.
        nonfinite: the number of non-finite values the sample counted at each step (0 where the
            file's departure is null only because nothing was measured).
    """

    layer: Untrusted
    call: int
    rank: int
    steps: tuple[int, ...]
    departures: tuple[float | None, ...]
    running_mean_norms: tuple[float | None, ...]
    running_var_means: tuple[float | None, ...]
    nonfinite: tuple[int, ...] = ()

    @property
    def label(self) -> Untrusted:
        """The layer as shown to people: name, with #call past the first call."""
        return self.layer if not self.call else Untrusted(f"{self.layer.raw}#{self.call}")

    def _measured(self) -> list[tuple[int, float]]:
        return [(s, d) for s, d in zip(self.steps, self.departures, strict=True) if d is not None]

    @property
    def first(self) -> float | None:
        """The departure at the first step it was measured."""
        measured = self._measured()
        return measured[0][1] if measured else None

    @property
    def last(self) -> float | None:
        """The departure at the last sampled step; None there when it was not finite (see
        ``ends_nonfinite``) or not measured: a layer that went NaN must not read as its last finite value."""
        return self.departures[-1] if self.departures else None

    @property
    def ends_nonfinite(self) -> bool:
        """True when the layer's last sample counted non-finite values and its departure is not finite."""
        return bool(self.nonfinite) and self.nonfinite[-1] > 0 and self.last is None

    @property
    def peak(self) -> tuple[int, float] | None:
        """(step, departure) of the largest departure; the earliest step where it ties."""
        measured = self._measured()
        if not measured:
            return None
        top = max(d for _, d in measured)
        return next((s, d) for s, d in measured if d == top)


@dataclass(frozen=True)
class ValidationGap:
    """The train/eval gap measured at one validation run: each layer's departure of the eval-mode data.

    Attributes:
        step: the training step the validation ran at.
        rank: the process that measured it.
        layers: (layer, departure) per layer, departure None where not finite.
        largest: the layer with the largest departure and it, or None when nothing was measured.
    """

    step: int
    rank: int
    layers: tuple[tuple[Untrusted, float | None], ...]
    largest: tuple[Untrusted, float | None] | None

    @property
    def first_departing(self) -> tuple[Untrusted, float | None] | None:
        """The first layer, in execution order (the record's), whose departure reaches the warning tier
        or is not finite: where the gap opens, as check names it; the largest is often a layer after it
        that only inherits its input. None when no layer departs."""
        warning = Thresholds().warning
        return next(((name, score) for name, score in self.layers if score is None or score >= warning), None)


@dataclass(frozen=True)
class Timeline:
    """What one watched run's timeline files hold (one file per rank, merged by rank then step).

    Attributes:
        files: the files read, in the order given.
        model: the watched model's class name.
        bn_inspect_version: the version that wrote the files.
        world_size: the number of processes of the run.
        every: the watch's sampling period in steps.
        ranks: the ranks whose files were read.
        layers: the watched layers' names, as the header lists them.
        events: every event, by rank then step.
        series: per layer call and rank, the sampled training steps.
        validations: the gaps measured at validation runs, by rank then step.
        last_step: the largest step any record names (0 for a file with only its header).
        num_samples: the number of training "sample" records read (phase "train"), as the end record counts.
        num_validation_samples: the number of validation "sample" records read (phase "validation").
        is_complete: every file has its "end" record (the run ended cleanly).
        notes: remarks on the files (a run killed or still running, a cut-off last line dropped).
        fail_on: the lowest severity of an event that fails the command.
    """

    files: tuple[Untrusted, ...]
    model: Untrusted
    bn_inspect_version: Untrusted
    world_size: int
    every: int
    ranks: tuple[int, ...]
    layers: tuple[Untrusted, ...]
    events: tuple[TimelineEvent, ...]
    series: tuple[LayerSeries, ...]
    validations: tuple[ValidationGap, ...]
    last_step: int
    num_samples: int
    is_complete: bool
    num_validation_samples: int = 0
    notes: tuple[str, ...] = ()
    fail_on: TimelineFailOn = TimelineFailOn.ERROR
    schema_version: int = field(default=OUTPUT_SCHEMA_VERSION)

    @property
    def failed(self) -> tuple[TimelineEvent, ...]:
        """Events at or above --fail-on (none for ``never``)."""
        if self.fail_on is TimelineFailOn.NEVER:
            return ()
        limit = Severity(self.fail_on.value).rank
        return tuple(e for e in self.events if e.severity.rank >= limit)

    @property
    def passed(self) -> bool:
        """True when no event reaches --fail-on."""
        return not self.failed

    @property
    def first_bad(self) -> TimelineEvent | None:
        """The earliest event that is an error or a warning (the first layer in the file's order at
        that step, the lowest rank first); None when every event is info or there is none."""
        bad = [e for e in self.events if e.severity.rank >= Severity.WARNING.rank]
        return min(bad, key=lambda e: e.step) if bad else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready document of kind "timeline" (timeline-output.schema.json)."""
        first = self.first_bad
        document = {
            "schema_version": self.schema_version,
            "kind": "timeline",
            "files": list(self.files),
            "model": self.model,
            "bn_inspect": self.bn_inspect_version,
            "world_size": self.world_size,
            "every": self.every,
            "ranks": list(self.ranks),
            "complete": self.is_complete,
            "last_step": self.last_step,
            "samples": self.num_samples,
            "validation_samples": self.num_validation_samples,
            "fail_on": self.fail_on.value,
            "passed": self.passed,
            "first_bad_step": None if first is None else _event_dict(first),
            "notes": list(self.notes),
            "events": [_event_dict(e) for e in self.events],
            "layers": [_series_dict(s) for s in self.series],
            "validations": [
                {
                    "step": v.step,
                    "rank": v.rank,
                    "largest": _gap_layer(v.largest),
                    "first_departing": _gap_layer(v.first_departing),
                    "layers": [{"layer": name, "departure": score} for name, score in v.layers],
                }
                for v in self.validations
            ],
        }
        return json_ready(document)  # type: ignore[no-any-return]


def _gap_layer(entry: tuple[Untrusted, float | None] | None) -> dict[str, Any] | None:
    return None if entry is None else {"layer": entry[0], "departure": entry[1]}


def _event_dict(event: TimelineEvent) -> dict[str, Any]:
    return {
        "step": event.step,
        "rank": event.rank,
        "code": event.code,
        "severity": event.severity.value,
        "layer": event.layer,
        "message": event.message,
        "values": {name.raw: value for name, value in event.values},
    }


def _series_dict(series: LayerSeries) -> dict[str, Any]:
    peak = series.peak
    return {
        "layer": series.layer,
        "call": series.call,
        "rank": series.rank,
        "first": series.first,
        "last": series.last,
        "max": None if peak is None else peak[1],
        "max_step": None if peak is None else peak[0],
        "steps": list(series.steps),
        "departures": list(series.departures),
        "running_mean_norms": list(series.running_mean_norms),
        "running_var_means": list(series.running_var_means),
        "nonfinite": list(series.nonfinite),
    }
