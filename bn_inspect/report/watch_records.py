"""The timeline a watch writes: its records as plain values and their JSON lines (format bn-inspect-timeline, version 1).

One JSON object per line: a header, then samples, events and validation records in the order
they happen, then an end record when the watch's block ends (a file without one was killed; the
end record of a block that raised names the exception). Every record but the header carries
``step`` (the watch's step: its count of training forwards from 0, or the user's
``watch.step(global_step)``) and ``rank`` (0 without torch.distributed). JSON has no NaN:
a figure that is not finite is written as null, and the event that names it says why.

Per layer call, a sample holds (``batch_*`` over the call's input, ``running_*`` after its update):

* ``values_per_channel``: numel // C of the input, what one batch statistic is computed over;
* ``departure``: the layer's departure score (report/departure.py) of the batch statistics
  against the running ones, null when either is missing or not finite;
* ``mean_shift_max``: max over channels of |batch_mean - running_mean| / sqrt(running_var + eps);
* ``var_ratio_min``, ``var_ratio_max``: the extremes over channels of batch_var / running_var
  (biased batch variance, what BatchNorm normalizes with);
* ``running_mean_norm``: the Euclidean norm of running_mean; ``running_var_mean``: the mean of
  running_var over channels;
* ``nonfinite``: how many input values are NaN or infinite;
* ``buffers_changed``, ``params_changed``: whether running_mean/running_var, weight/bias differ
  from the previous sample (from the watch's start for the first); ``params_requires_grad``:
  whether the affine parameters train (false without any); ``training``: the layer's mode.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from bn_inspect.report import shift
from bn_inspect.report.departure import Thresholds, measure

FORMAT = "bn-inspect-timeline"
VERSION = 1
Figure = float | int | str
Floats = tuple[float, ...]


@dataclass(frozen=True)
class WatchedLayer:
    """A layer the watch hooks, as the header lists it: qualified name, class name, channel count."""

    layer: str
    kind: str
    channels: int


@dataclass(frozen=True)
class CallStatistics:
    """One layer call at a sample step: its per-channel statistics as host floats and its flags.

    Attributes:
        samples: the samples behind each batch statistic (the batch size: a sample's pixels move together).
        has_running: the layer tracks running statistics (False: ``track_running_stats=False``).
        has_affine: the layer has weight and bias.
        eps: the layer's eps.
    """

    layer: str
    call: int
    values_per_channel: int
    samples: int
    batch_mean: Floats
    batch_var: Floats
    running_mean: Floats
    running_var: Floats
    eps: float
    nonfinite: int
    buffers_changed: bool
    params_changed: bool
    params_requires_grad: bool
    training: bool
    has_running: bool
    has_affine: bool


@dataclass(frozen=True)
class CallSummary:
    """The per-layer summary a sample keeps of one call (the module's text gives each formula)."""

    layer: str
    call: int
    values_per_channel: int
    departure: float | None
    mean_shift_max: float
    var_ratio_min: float
    var_ratio_max: float
    running_mean_norm: float
    running_var_mean: float
    nonfinite: int
    buffers_changed: bool
    params_changed: bool
    params_requires_grad: bool
    training: bool
    # Not written: what the rules need to know of the layer.
    has_running: bool = True
    has_affine: bool = True


def summarize(call: CallStatistics, thresholds: Thresholds | None = None) -> CallSummary:
    """The summary of one call: its departure score, shift and ratio extremes, running-buffer sizes."""
    z = shift.mean_shift_z(call.batch_mean, call.running_mean, call.running_var, call.eps) if call.has_running else ()
    ratios = shift.var_ratio(call.batch_var, call.running_var) if call.has_running else ()
    score = None
    if call.has_running and call.samples and call.batch_mean:
        found = measure(
            call.batch_mean, call.batch_var, call.running_mean, call.running_var, call.eps, call.samples, thresholds
        )
        score = found.score if math.isfinite(found.score) else None
    return CallSummary(
        layer=call.layer,
        call=call.call,
        values_per_channel=call.values_per_channel,
        departure=score,
        mean_shift_max=_or_nan(shift.max_abs(z)),
        var_ratio_min=_extreme(min, ratios),
        var_ratio_max=_extreme(max, ratios),
        running_mean_norm=math.sqrt(math.fsum(v * v for v in call.running_mean)) if call.running_mean else math.nan,
        running_var_mean=math.fsum(call.running_var) / len(call.running_var) if call.running_var else math.nan,
        nonfinite=call.nonfinite,
        buffers_changed=call.buffers_changed,
        params_changed=call.params_changed,
        params_requires_grad=call.params_requires_grad,
        training=call.training,
        has_running=call.has_running,
        has_affine=call.has_affine,
    )


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _extreme(pick: Callable[[Sequence[float]], float], values: Sequence[float]) -> float:
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    return float(pick(values))


@dataclass(frozen=True)
class WatchEvent:
    """Something the watch found, at the step it happened: a BN5xx code on a layer (or the model, layer None).

    Attributes:
        values: the code's figures (BN504: max_abs_diff and buffer; BN505: values_per_channel;
            BN506: departure and steps).
    """

    step: int
    code: str
    severity: str
    layer: str | None
    message: str
    values: Mapping[str, Figure] = field(default_factory=dict)
    rank: int = 0

    def line(self) -> str:
        """The event as one line of text: step, code, severity, layer, message."""
        where = self.layer if self.layer is not None else "(model)"
        return f"step {self.step}: {self.code} {self.severity} {where}: {self.message}"


# A group of events lists at most this many layers by name, then counts the rest.
GROUP_NAMES_SHOWN = 8


def grouped_event_lines(events: Sequence[WatchEvent]) -> list[str]:
    """The events as lines, those of one step, code and severity on several layers as one line with the layer list.

    A frozen backbone gives one BN503 per layer, whose messages differ only by the name: one line
    lists the layers (the first GROUP_NAMES_SHOWN, then a count) and shows the first layer's
    message. Groups keep the order in which their first event was found.
    """
    groups: dict[tuple[int, str, str], list[WatchEvent]] = {}
    for event in events:
        groups.setdefault((event.step, event.code, event.severity), []).append(event)
    lines = []
    for (step, code, severity), members in groups.items():
        named = [e for e in members if e.layer is not None]
        if len(members) == 1 or len(named) != len(members):
            lines += [e.line() for e in members]
            continue
        names = [str(e.layer) for e in named]
        shown = ", ".join(names[:GROUP_NAMES_SHOWN])
        rest = len(names) - GROUP_NAMES_SHOWN
        listing = f"{shown} and {rest:,} more" if rest > 0 else f"{', '.join(names[:-1])} and {names[-1]}"
        first = members[0]
        lines.append(
            f"step {step}: {code} {severity} on {len(names):,} layers ({listing}); in {first.layer}: {first.message}"
        )
    return lines


def _number(value: float | None, digits: int) -> float | None:
    # Rounded to what the statistics hold (float32 inputs carry about 7 digits): shorter lines, the
    # same information. Not finite: null.
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _numbers(values: Sequence[float]) -> list[float | None]:
    return [_number(v, 7) for v in values]


def json_line(record: Mapping[str, object]) -> str:
    """One record as its line: compact JSON, UTF-8 text kept as is (the writer encodes it)."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def header_record(
    *,
    version: str,
    rank: int,
    world_size: int,
    every: int,
    detail_every: int,
    model: str,
    created: str,
    layers: Sequence[WatchedLayer],
) -> dict[str, object]:
    """The first line of a timeline."""
    return {
        "record": "header",
        "format": FORMAT,
        "version": VERSION,
        "bn_inspect": version,
        "rank": rank,
        "world_size": world_size,
        "every": every,
        "detail_every": detail_every,
        "model": model,
        "created": created,
        "layers": [{"layer": w.layer, "kind": w.kind, "channels": w.channels} for w in layers],
    }


def sample_record(
    step: int,
    rank: int,
    summaries: Sequence[CallSummary],
    detail: Sequence[CallStatistics] = (),
    phase: str = "train",
) -> dict[str, object]:
    """A sample: every call's summary, and the per-channel statistics of ``detail`` when given.

    ``phase`` is "train", or "validation" for the statistics of a validation run (the Lightning callback's).
    """
    record: dict[str, object] = {
        "record": "sample",
        "step": step,
        "rank": rank,
        "phase": phase,
        "layers": [_summary_entry(s) for s in summaries],
    }
    if detail:
        record["detail"] = [
            {
                "layer": c.layer,
                "call": c.call,
                "batch_mean": _numbers(c.batch_mean),
                "batch_var": _numbers(c.batch_var),
                "running_mean": _numbers(c.running_mean),
                "running_var": _numbers(c.running_var),
            }
            for c in detail
        ]
    return record


def _summary_entry(s: CallSummary) -> dict[str, object]:
    return {
        "layer": s.layer,
        "call": s.call,
        "values_per_channel": s.values_per_channel,
        "departure": _number(s.departure, 6),
        "mean_shift_max": _number(s.mean_shift_max, 6),
        "var_ratio_min": _number(s.var_ratio_min, 6),
        "var_ratio_max": _number(s.var_ratio_max, 6),
        "running_mean_norm": _number(s.running_mean_norm, 6),
        "running_var_mean": _number(s.running_var_mean, 6),
        "nonfinite": s.nonfinite,
        "buffers_changed": s.buffers_changed,
        "params_changed": s.params_changed,
        "params_requires_grad": s.params_requires_grad,
        "training": s.training,
    }


def event_record(event: WatchEvent) -> dict[str, object]:
    """An event's line."""
    values = {k: (_number(v, 6) if isinstance(v, float) else v) for k, v in event.values.items()}
    return {
        "record": "event",
        "step": event.step,
        "rank": event.rank,
        "code": event.code,
        "severity": event.severity,
        "layer": event.layer,
        "message": event.message,
        "values": values,
    }


def validation_record(step: int, rank: int, gaps: Sequence[tuple[str, float | None]]) -> dict[str, object]:
    """The train/eval gap at a validation run: each layer's departure of validation data from its running statistics."""
    layers = [{"layer": name, "departure": _number(score, 6)} for name, score in gaps]
    scored = [(score, name) for name, score in gaps if score is not None and math.isfinite(score)]
    largest = None
    if scored:
        score, name = max(scored)
        largest = {"layer": name, "departure": _number(score, 6)}
    return {"record": "validation", "step": step, "rank": rank, "gap": {"layers": layers, "largest": largest}}


# An exception's message in the end record is cut here: it says what ended the run, not its traceback.
EXCEPTION_MESSAGE_CHARACTERS = 200


def end_record(
    step: int, rank: int, *, steps: int, samples: int, events: int, raised: BaseException | None = None
) -> dict[str, object]:
    """The last line, written when the watch's block ends; ``raised``: the exception it ended with, if any.

    The exception is kept as ``exception``: its class name and the first line of its message (at
    most EXCEPTION_MESSAGE_CHARACTERS), so a reader can tell a run that raised (or that the watch
    refused) from one that finished.
    """
    record: dict[str, object] = {
        "record": "end",
        "step": step,
        "rank": rank,
        "steps": steps,
        "samples": samples,
        "events": events,
    }
    if raised is not None:
        lines = str(raised).strip().splitlines()
        message = lines[0] if lines else ""
        if len(message) > EXCEPTION_MESSAGE_CHARACTERS:
            message = message[: EXCEPTION_MESSAGE_CHARACTERS - 1] + "…"
        record["exception"] = {"type": type(raised).__name__, "message": message}
    return record
