"""Timeline files shaped as the contract says (what bn_inspect.watch writes), built record by record for the reader's tests.

``timeline_records`` makes a run: a header, a train sample every ``every`` steps with each layer's
departure from ``departure(layer, step)``, validation samples and gaps where asked, events, and an
end record; ``write_timeline`` writes them as JSON Lines.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

LAYERS = ("features.1", "features.4", "features.8")


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def header(rank: int = 0, world_size: int = 1, every: int = 10, layers: Sequence[str] = LAYERS) -> dict[str, Any]:
    return {
        "record": "header",
        "format": "bn-inspect-timeline",
        "version": 1,
        "bn_inspect": "0.1.0",
        "rank": rank,
        "world_size": world_size,
        "every": every,
        "detail_every": 20,
        "model": "DigitsCNN",
        "created": "2026-12-07T17:00:00Z",
        "layers": [{"layer": name, "kind": "BatchNorm2d", "channels": 4} for name in layers],
    }


def sample_layer(layer: str, departure: float, call: int = 0) -> dict[str, Any]:
    """One layer call's summary in a sample: its running statistics drift with the departure."""
    return {
        "layer": layer,
        "call": call,
        "values_per_channel": 512,
        "departure": _finite_or_none(departure),
        "mean_shift_max": _finite_or_none(2.0 * departure),
        "var_ratio_min": 0.9,
        "var_ratio_max": _finite_or_none(1.1 + departure),
        "running_mean_norm": _finite_or_none(1.0 + departure),
        "running_var_mean": _finite_or_none(0.5 + departure / 2),
        "nonfinite": 0 if math.isfinite(departure) else 12,
        "buffers_changed": True,
        "params_changed": True,
        "params_requires_grad": True,
        "training": True,
    }


def sample(step: int, departures: dict[str, float], rank: int = 0, phase: str = "train") -> dict[str, Any]:
    return {
        "record": "sample",
        "step": step,
        "rank": rank,
        "phase": phase,
        "layers": [sample_layer(name, value) for name, value in departures.items()],
    }


def event(
    step: int,
    code: str,
    severity: str,
    layer: str | None,
    message: str,
    rank: int = 0,
    **values: float | str | None,
) -> dict[str, Any]:
    return {
        "record": "event",
        "step": step,
        "rank": rank,
        "code": code,
        "severity": severity,
        "layer": layer,
        "message": message,
        "values": values,
    }


def validation(step: int, gaps: dict[str, float], rank: int = 0) -> dict[str, Any]:
    largest = max(gaps, key=lambda name: gaps[name])
    return {
        "record": "validation",
        "step": step,
        "rank": rank,
        "gap": {
            "layers": [{"layer": name, "departure": value} for name, value in gaps.items()],
            "largest": {"layer": largest, "departure": gaps[largest]},
        },
    }


def default_departure(layer: str, step: int) -> float:
    """features.4's statistics start lagging the batches at step 50 and grow; the others stay within."""
    if layer == "features.4" and step >= 50:
        return 0.3 + 0.02 * (step - 50)
    return 0.1 + 0.001 * step


def timeline_records(
    steps: int = 100,
    every: int = 10,
    *,
    rank: int = 0,
    world_size: int = 1,
    layers: Sequence[str] = LAYERS,
    departure: Callable[[str, int], float] = default_departure,
    events: Sequence[dict[str, Any]] = (),
    validate_every: int | None = None,
    is_complete: bool = True,
) -> list[dict[str, Any]]:
    """A whole run's records, in the order a watch writes them (events at their step, before its sample)."""
    records = [header(rank, world_size, every, layers)]
    pending = sorted(events, key=lambda e: e["step"])
    for step in range(every, steps + 1, every):
        while pending and pending[0]["step"] <= step:
            records.append(pending.pop(0))
        records.append(sample(step, {name: departure(name, step) for name in layers}, rank))
        if validate_every and step % validate_every == 0:
            records.append(sample(step, {name: departure(name, step) / 2 for name in layers}, rank, "validation"))
            records.append(validation(step, {name: departure(name, step) / 2 for name in layers}, rank))
    records += pending
    if is_complete:
        count = sum(r["record"] == "sample" for r in records)
        num_events = sum(r["record"] == "event" for r in records)
        records.append(
            {"record": "end", "step": steps, "rank": rank, "steps": steps, "samples": count, "events": num_events}
        )
    return records


def lines(records: Sequence[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(record).encode("utf-8") + b"\n" for record in records)


def write_timeline(path: Path, records: Sequence[dict[str, Any]] | None = None, **options: Any) -> Path:
    """Write ``records`` (or ``timeline_records(**options)``) to ``path`` as JSON Lines; returns the path."""
    path.write_bytes(lines(records if records is not None else timeline_records(**options)))
    return path


LAG_EVENT = event(
    70,
    "BN506",
    "warning",
    "features.4",
    "running statistics lag the batches: departure 0.7 for 3 samples",
    departure=0.7,
    steps=3,
)
NAN_EVENT = event(
    90, "BN501", "error", "features.8", "a non-finite value first appeared in the input of features.8", nonfinite=12.0
)
