"""Timeline files (JSON Lines written by ``bn_inspect.watch``) read back into a Timeline, one line at a time.

A timeline comes from a training run that may have been killed mid-line, or from someone else: it
is opened through the boundary's opener (a regular file within TIMELINE_BUDGET), read a line at a
time within LINE_BUDGET (a huge line is refused before it is held), every integer bounded while
JSON is parsed, and every record checked for its keys and their types before any is used. A file
that is not a timeline, a newer format, or a corrupted record ends in one TimelineFileError naming
the file and the line; only a cut-off last line (a kill during a write) is dropped, with a note.
Per-channel "detail" is checked for its shape and then let go: the command shows per-layer values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO

from bn_inspect.boundary.reading import Source, open_checked
from bn_inspect.errors import TimelineFileError
from bn_inspect.options import TimelineFailOn
from bn_inspect.report.findings import Severity
from bn_inspect.report.timeline import (
    TIMELINE_FORMAT,
    TIMELINE_VERSION,
    LayerSeries,
    Timeline,
    TimelineEvent,
    ValidationGap,
)
from bn_inspect.text import Untrusted, one_line

# A ResNet-50 watched for 100,000 steps at every=50 writes under 50 MB; 16 times that is no timeline.
TIMELINE_BUDGET = 1024 * 2**20
# One record: a sample with per-channel detail of a model with 100,000 channels over all its
# layers is about 10 MB; a longer line is refused before it is parsed.
LINE_BUDGET = 64 * 2**20
_MAX_INTEGER = 2**63
_FIX = "Give a timeline written by bn_inspect.watch (or BNWatch), unchanged"

# Each record type's required keys and what each holds: "int", "num" (a number or null: the file
# writes what is not finite as null), "bool", "str", "str?" (a string or null), "list", "dict".
_RECORD_KEYS: dict[str, dict[str, str]] = {
    "header": {"rank": "int", "world_size": "int", "every": "int", "model": "str", "bn_inspect": "str"},
    "sample": {"step": "int", "rank": "int", "phase": "str", "layers": "list"},
    "event": {
        "step": "int",
        "rank": "int",
        "code": "str",
        "severity": "str",
        "layer": "str?",
        "message": "str",
        "values": "dict",
    },
    "validation": {"step": "int", "rank": "int", "gap": "dict"},
    "end": {"step": "int", "rank": "int", "steps": "int", "samples": "int", "events": "int"},
}
_SAMPLE_LAYER_KEYS = {
    "layer": "str",
    "call": "int",
    "values_per_channel": "int",
    "departure": "num",
    "mean_shift_max": "num",
    "var_ratio_min": "num",
    "var_ratio_max": "num",
    "running_mean_norm": "num",
    "running_var_mean": "num",
    "nonfinite": "int",
    "buffers_changed": "bool",
    "params_changed": "bool",
    "params_requires_grad": "bool",
    "training": "bool",
}
_HEADER_LAYER_KEYS = {"layer": "str", "kind": "str", "channels": "int"}
_DETAIL_KEYS = {
    "layer": "str",
    "call": "int",
    "batch_mean": "list",
    "batch_var": "list",
    "running_mean": "list",
    "running_var": "list",
}
_GAP_LAYER_KEYS = {"layer": "str", "departure": "num"}
_PHASES = ("train", "validation")


class _Corrupted(ValueError):
    """What is wrong with one record; the reader adds the file and the line."""


class _NumberError(ValueError):
    """A number no timeline holds, raised inside json's parser."""


def _bounded_int(text: str) -> int:
    # Checked by its digits before int() reads it: Python refuses past 4,300 digits with a ValueError.
    if len(text.lstrip("-")) > 19 or abs(value := int(text)) >= _MAX_INTEGER:
        raise _NumberError(f"an integer of {len(text.lstrip('-')):,} digits, larger than any timeline holds")
    return value


def _no_constant(text: str) -> float:
    raise _NumberError(f"the bare constant {text} (a timeline writes what is not finite as null)")


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "num":
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str?":
        return value is None or isinstance(value, str)
    return isinstance(value, {"str": str, "list": list, "dict": dict}[kind])


def _checked(value: Any, keys: dict[str, str], where: str) -> dict[str, Any]:
    """``value`` as a dict holding every key of ``keys`` with a value of its kind."""
    if not isinstance(value, dict):
        raise _Corrupted(f"{where} is not a JSON object")
    for key, kind in keys.items():
        if key not in value:
            raise _Corrupted(f'{where} lacks "{key}"')
        if not _is_kind(value[key], kind):
            raise _Corrupted(f'{where} has a "{key}" that is not {_KIND_WORDS[kind]}')
    return value


_KIND_WORDS = {
    "int": "an integer",
    "num": "a number or null",
    "bool": "true or false",
    "str": "a string",
    "str?": "a string or null",
    "list": "a list",
    "dict": "an object",
}


def _number(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


@dataclass
class _FileContents:
    """What one file holds, as its lines are read."""

    header: dict[str, Any]
    events: list[TimelineEvent] = field(default_factory=list)
    samples: dict[tuple[str, int], list[tuple[int, float | None, float | None, float | None, int]]] = field(
        default_factory=dict
    )
    validations: list[ValidationGap] = field(default_factory=list)
    last_step: int = 0
    num_samples: int = 0
    num_validation_samples: int = 0
    has_end: bool = False
    notes: list[str] = field(default_factory=list)


def _lines(stream: BinaryIO, name: str) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line without its end, whether it ended with a newline) for each line, within LINE_BUDGET."""
    number = 0
    while True:
        line = stream.readline(LINE_BUDGET + 1)
        if not line:
            return
        number += 1
        if len(line) > LINE_BUDGET:
            raise TimelineFileError(
                f"timeline {name} line {number:,} is over the {LINE_BUDGET:,}-byte budget for one record", _FIX
            )
        yield number, line.rstrip(b"\r\n"), line.endswith(b"\n")


def _parse(line: bytes) -> Any:
    return json.loads(line.decode("utf-8"), parse_int=_bounded_int, parse_constant=_no_constant)


def read_timeline(path: Path) -> _FileContents:
    """Read one timeline file; see ``read_timelines``."""
    name = one_line(str(path))
    with (
        open_checked(
            path, Source.TIMELINE, noun="timeline", error=TimelineFileError, max_bytes=TIMELINE_BUDGET
        ) as opened,
        opened.stream() as stream,
    ):
        contents: _FileContents | None = None
        for number, line, ended in _lines(stream, name):
            if not line.strip():
                continue
            try:
                record = _parse(line)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, _NumberError) as error:
                # A kill while a line was written leaves it cut off and without its newline: that
                # last line is lost, as the format allows; anywhere else the file is corrupted.
                if not ended and contents is not None:
                    contents.notes.append(
                        f"{name}: its last line (line {number:,}) is cut off, as a kill during a write "
                        "leaves it; that record was dropped"
                    )
                    break
                if contents is None:
                    raise _foreign(name) from None
                raise TimelineFileError(
                    f"timeline {name} line {number:,} is corrupted: {_why_not_json(error)}", _FIX
                ) from None
            if contents is None:
                contents = _FileContents(_header(record, name))
                continue
            try:
                _take(contents, record)
            except _Corrupted as error:
                raise TimelineFileError(f"timeline {name} line {number:,} is corrupted: {error}", _FIX) from None
    if contents is None:
        raise TimelineFileError(f"timeline {name} is empty", _FIX)
    if not contents.has_end:
        contents.notes.append(
            f"{name} has no end record: the run was killed or is still running (last step {contents.last_step:,})"
        )
    return contents


def _why_not_json(error: Exception) -> str:
    if isinstance(error, UnicodeDecodeError):
        return "it is not UTF-8"
    if isinstance(error, _NumberError):
        return f"it holds {error}"
    return "it is not a JSON object"


def _foreign(name: str) -> TimelineFileError:
    return TimelineFileError(
        f"{name} is not a bn-inspect timeline (its first line is not a timeline header)",
        "Give a file written by bn_inspect.watch (or the BNWatch callback), e.g. runs/bn-watch.jsonl",
    )


def _header(record: Any, name: str) -> dict[str, Any]:
    if not isinstance(record, dict) or record.get("record") != "header" or record.get("format") != TIMELINE_FORMAT:
        raise _foreign(name)
    version = record.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise TimelineFileError(f"timeline {name} has no valid version in its header", _FIX)
    if version > TIMELINE_VERSION:
        raise TimelineFileError(
            f"timeline {name} was made by a newer bn-inspect (timeline version {version}; this one reads "
            f"version {TIMELINE_VERSION})",
            "Upgrade: python -m pip install -U bn-inspect",
        )
    try:
        header = _checked(record, _RECORD_KEYS["header"] | {"layers": "list"}, "the header")
        for index, layer in enumerate(header["layers"]):
            _checked(layer, _HEADER_LAYER_KEYS, f"layer {index} of the header")
    except _Corrupted as error:
        raise TimelineFileError(f"timeline {name} line 1 is corrupted: {error}", _FIX) from None
    return header


def _take(contents: _FileContents, record: Any) -> None:
    """Check one record after the header and keep what the command shows of it."""
    kind = record.get("record") if isinstance(record, dict) else None
    if kind == "header":
        raise _Corrupted("a second header (two timelines in one file?)")
    if kind not in _RECORD_KEYS:
        raise _Corrupted(f"a record of unknown type {one_line(repr(kind))[:40]}")
    record = _checked(record, _RECORD_KEYS[kind], f'the "{kind}" record')
    if record["rank"] != contents.header["rank"]:
        raise _Corrupted(f"a record of rank {record['rank']} in the file of rank {contents.header['rank']}")
    contents.last_step = max(contents.last_step, record["step"])
    if kind == "sample":
        _take_sample(contents, record)
    elif kind == "event":
        contents.events.append(_event(record))
    elif kind == "validation":
        contents.validations.append(_validation(record))
    else:
        contents.has_end = True
        contents.notes.extend(_ending(record))


def _take_sample(contents: _FileContents, record: dict[str, Any]) -> None:
    if record["phase"] not in _PHASES:
        raise _Corrupted(f"a sample of unknown phase {one_line(repr(record['phase']))[:40]}")
    for index, layer in enumerate(record["layers"]):
        _checked(layer, _SAMPLE_LAYER_KEYS, f"layer {index} of the sample")
    for index, detail in enumerate(record.get("detail") or []):
        _checked(detail, _DETAIL_KEYS, f"detail {index} of the sample")
    if record["phase"] != "train":
        contents.num_validation_samples += 1
        return
    contents.num_samples += 1
    for layer in record["layers"]:
        points = contents.samples.setdefault((layer["layer"], layer["call"]), [])
        points.append(
            (
                record["step"],
                _number(layer["departure"]),
                _number(layer["running_mean_norm"]),
                _number(layer["running_var_mean"]),
                layer["nonfinite"],
            )
        )


def _event(record: dict[str, Any]) -> TimelineEvent:
    try:
        severity = Severity(record["severity"])
    except ValueError:
        raise _Corrupted(f"an event of unknown severity {one_line(repr(record['severity']))[:40]}") from None
    values: list[tuple[Untrusted, float | Untrusted | None]] = []
    for key, value in record["values"].items():
        # BN504 names the buffer that differs ("buffer": "running_mean") beside its numbers.
        if isinstance(value, str):
            values.append((Untrusted(key), Untrusted(value)))
        elif _is_kind(value, "num"):
            values.append((Untrusted(key), _number(value)))
        else:
            raise _Corrupted(f'an event whose value "{one_line(key)[:40]}" is not a number, a string or null')
    layer = record["layer"]
    return TimelineEvent(
        step=record["step"],
        rank=record["rank"],
        code=one_line(record["code"])[:16],
        severity=severity,
        layer=None if layer is None else Untrusted(layer),
        message=Untrusted(record["message"]),
        values=tuple(values),
    )


def _validation(record: dict[str, Any]) -> ValidationGap:
    gap = _checked(record["gap"], {"layers": "list"}, "the validation's gap")
    layers = [_checked(entry, _GAP_LAYER_KEYS, f"layer {i} of the gap") for i, entry in enumerate(gap["layers"])]
    largest = gap.get("largest")
    if largest is not None:
        largest = _checked(largest, _GAP_LAYER_KEYS, "the gap's largest")
    return ValidationGap(
        step=record["step"],
        rank=record["rank"],
        layers=tuple((Untrusted(entry["layer"]), _number(entry["departure"])) for entry in layers),
        largest=None if largest is None else (Untrusted(largest["layer"]), _number(largest["departure"])),
    )


def read_timelines(paths: Sequence[Path], fail_on: TimelineFailOn = TimelineFailOn.ERROR) -> Timeline:
    """Read the timeline files of one watched run (one per rank) and merge them by rank, then step.

    Args:
        paths: the files, e.g. ``runs/bn-watch.jsonl runs/bn-watch.rank1.jsonl``.
        fail_on: the lowest severity of an event that fails the command.

    Returns:
        The Timeline; its notes say when a file has no end record (the run was killed or still
        runs) or a cut-off last line was dropped.

    Raises:
        TimelineFileError: a file is missing, not a regular file, over TIMELINE_BUDGET, not a
            timeline, of a newer version, holds a corrupted record (named by its line) or a line
            over LINE_BUDGET; or two files hold the same rank, or are of different runs: another
            world size, model, sampling period, bn-inspect version or layers, or headers created more
            than RUN_START_SPREAD apart.
    """
    contents = [read_timeline(path) for path in paths]
    world_sizes = {content.header["world_size"] for content in contents}
    if len(world_sizes) > 1:
        raise TimelineFileError(
            f"the timelines come from runs of {' and '.join(str(w) for w in sorted(world_sizes))} processes",
            "Give the files of one run",
        )
    for path, content in zip(paths[1:], contents[1:], strict=True):
        _check_same_run(paths[0], contents[0].header, path, content.header)
    by_rank: dict[int, tuple[Path, _FileContents]] = {}
    for path, content in zip(paths, contents, strict=True):
        rank = content.header["rank"]
        if rank in by_rank:
            raise TimelineFileError(
                f"timelines {one_line(str(by_rank[rank][0]))} and {one_line(str(path))} both hold rank {rank}",
                "Give each rank's file once",
            )
        by_rank[rank] = (path, content)
    ranked = [by_rank[rank][1] for rank in sorted(by_rank)]
    first = ranked[0].header
    return Timeline(
        files=tuple(Untrusted(str(path)) for path in paths),
        model=Untrusted(first["model"]),
        bn_inspect_version=Untrusted(first["bn_inspect"]),
        world_size=first["world_size"],
        every=first["every"],
        ranks=tuple(sorted(by_rank)),
        layers=tuple(Untrusted(layer["layer"]) for layer in first["layers"]),
        events=tuple(e for c in ranked for e in sorted(c.events, key=lambda e: e.step)),
        series=tuple(s for c in ranked for s in _series_of(c)),
        validations=tuple(v for c in ranked for v in sorted(c.validations, key=lambda v: v.step)),
        last_step=max(c.last_step for c in ranked),
        num_samples=sum(c.num_samples for c in ranked),
        num_validation_samples=sum(c.num_validation_samples for c in ranked),
        is_complete=all(c.has_end for c in ranked),
        notes=tuple(note for c in contents for note in c.notes),
        fail_on=fail_on,
    )


# The ranks of one run each stamp their header when their watch opens: seconds apart, minutes at most
# where one rank waits on a slow start; two runs of one script are told apart by this.
RUN_START_SPREAD = timedelta(minutes=10)


def _created(header: dict[str, Any]) -> datetime | None:
    created = header.get("created")
    try:
        stamp = datetime.fromisoformat(created) if isinstance(created, str) else None
    except ValueError:
        return None
    return stamp if stamp is None or stamp.tzinfo is not None else stamp.replace(tzinfo=timezone.utc)


def _check_same_run(first_path: Path, first: dict[str, Any], path: Path, header: dict[str, Any]) -> None:
    """Refuse ``header`` unless it is of the run ``first`` is: the same model, sampling, layers and start."""
    differences = [
        f"{what} {one_line(str(first[key]))[:40]} vs {one_line(str(header[key]))[:40]}"
        for key, what in (("model", "model"), ("every", "sampled every"), ("bn_inspect", "bn-inspect"))
        if first[key] != header[key]
    ]
    if [layer["layer"] for layer in first["layers"]] != [layer["layer"] for layer in header["layers"]]:
        differences.append("different layers")
    started = (_created(first), _created(header))
    if started[0] is not None and started[1] is not None and abs(started[0] - started[1]) > RUN_START_SPREAD:
        differences.append(f"created {first['created']} vs {header['created']}")
    if differences:
        raise TimelineFileError(
            f"timelines {one_line(str(first_path))} and {one_line(str(path))} are of different runs "
            f"({one_line('; '.join(differences))})",
            "Only the rank files of one run can be merged: give each run's files on their own",
        )


def _series_of(contents: _FileContents) -> list[LayerSeries]:
    series = []
    rank = contents.header["rank"]
    for (layer, call), points in contents.samples.items():
        points.sort(key=lambda point: point[0])
        series.append(
            LayerSeries(
                layer=Untrusted(layer),
                call=call,
                rank=rank,
                steps=tuple(p[0] for p in points),
                departures=tuple(p[1] for p in points),
                running_mean_norms=tuple(p[2] for p in points),
                running_var_means=tuple(p[3] for p in points),
                nonfinite=tuple(p[4] for p in points),
            )
        )
    return series


def _ending(end: dict[str, Any]) -> list[str]:
    """A note when the end record says the block raised (``exception``) or nothing was watched (0 steps)."""
    raised = end.get("exception")
    kind = message = ""
    if raised is not None:
        raised = _checked(raised, {"type": "str", "message": "str"}, "the end record's exception")
        kind, message = one_line(raised["type"])[:60], one_line(raised["message"])[:200].rstrip(".")
    if end["steps"] == 0:
        return [f"nothing was watched (0 steps){f'; the watch ended with {kind}: {message}' if kind else ''}"]
    if raised is None:
        return []
    run = "the run" if end["rank"] == 0 else f"rank {end['rank']}'s run"
    return [f"{run} ended with {kind} at step {end['step']:,}: {message}"]
