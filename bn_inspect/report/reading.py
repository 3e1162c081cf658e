"""JSON inspect report files: read back into a Report (the inverse of ``Report.to_dict``) for diff and
check --baseline, and written, atomically, by check --write-baseline.

Reads documents of schema version 1, including those written before a field was added ("kind",
the fingerprints: they read as None or ""). A report comes from a file someone handed over: it is
opened through the boundary's opener (a regular file within REPORT_BUDGET), its integers are
bounded while JSON is parsed, and every field is checked against the record's type (per-channel
lists against the channel count, numbers finite) before any is used; anything wrong ends in one
ReportFileError naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from bn_inspect.boundary.reading import OpenedInput, Source, open_checked
from bn_inspect.boundary.writing import Destination, write_output
from bn_inspect.errors import ReportFileError
from bn_inspect.report.layer_moments import LayerMoments
from bn_inspect.report.records import SCHEMA_VERSION, LayerReport, Report
from bn_inspect.text import Untrusted

READABLE_VERSIONS = (1,)
# What json_ready writes for non-finite floats.
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# A report of a 10,000-layer model with 2,048 channels a layer is ~40 MB; anything larger is not one
# of ours, and json would hold several times its size in memory.
REPORT_BUDGET = 64 * 2**20
# How far into a file its kind is judged: past any leading blank lines a person may have added.
_SNIFF_BYTES = 64 * 2**10
# Every integer a report holds (counts, shapes, indices) is far below 2**63.
_MAX_INTEGER = 2**63
_JSON_BLANKS = b" \t\r\n"
_PER_CHANNEL = ("batch_mean", "batch_var", "batch_var_unbiased", "running_mean", "running_var", "weight", "bias")
_STATISTICS = _PER_CHANNEL[:5]
_REPORT_FIX = "Give a report written by `bn-inspect inspect --format json`"


def looks_like_report(head: bytes, size: int) -> bool:
    """Whether a file of ``size`` bytes starting with ``head`` is a JSON object with a key first.

    Leading blanks and a UTF-8 byte order mark are allowed, as the JSON reader allows them. A
    safetensors file also has a "{" early (at byte 8, after its header's length), but that length
    then fits in the file, which blanks read as a little-endian number never do.
    """
    if head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return False
    body = head.removeprefix(b"\xef\xbb\xbf").lstrip(_JSON_BLANKS)
    return body[:1] == b"{" and body[1:].lstrip(_JSON_BLANKS)[:1] == b'"'


def read_diff_side(path: Path, name: str) -> Report | None:
    """The report in ``path`` if it is a JSON report; None if it is something else (a model file).

    The file is judged through the opener first, so a named pipe or a device is one error, never a
    read that blocks; only then are its first bytes looked at.

    Raises:
        ReportFileError: the path is not a regular file, or it looks like a report but is no valid one.
    """
    with open_checked(path, Source.DIFF_SIDE, noun=f"{name} file", error=ReportFileError) as opened:
        with opened.stream() as stream:
            head = stream.read(_SNIFF_BYTES)
        if not looks_like_report(head, opened.size):
            return None
        return _read_opened(opened)


def load_report(path: Path, source: Source = Source.BASELINE) -> Report:
    """Read an inspect report (``bn-inspect inspect --format json``) back into a Report.

    Raises:
        ReportFileError: the file is missing or not a regular file, over REPORT_BUDGET, not UTF-8
            JSON, not an inspect report, of an unknown schema version, or holds a field of the wrong
            type, a per-channel list of the wrong length, a non-finite number or an unbounded integer.
    """
    with open_checked(
        path,
        source,
        noun="report",
        error=ReportFileError,
        max_bytes=REPORT_BUDGET,
        fix="Give the path of a JSON report written by bn-inspect",
    ) as opened:
        return _read_opened(opened)


def _read_opened(opened: OpenedInput) -> Report:
    if opened.size > REPORT_BUDGET:
        raise ReportFileError(
            f"report {opened.path} is {opened.size:,} bytes, over the {REPORT_BUDGET:,}-byte budget for a report",
            "Check that it is the right file",
        )
    try:
        document = json.loads(
            opened.read_bytes().decode("utf-8-sig"),
            parse_int=_bounded_int,
            parse_constant=_no_constant,
        )
    except _NumberError as error:
        raise ReportFileError(f"report {opened.path} holds {error}", f"{_REPORT_FIX}, unchanged") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ReportFileError(
            f"cannot read report {opened.path} as JSON ({type(error).__name__})", _REPORT_FIX
        ) from error
    try:
        return report_from_dict(document, f"report {opened.path}")
    except ReportFileError as error:
        # A field's error names its JSON path; a test log or a CI line also needs the file's.
        if str(opened.path) in error.what:
            raise
        raise ReportFileError(f"report {opened.path}: {error.what}", error.fix) from None


class _NumberError(ValueError):
    """A number no report holds; raised inside json's parser, so it is caught before json's own errors."""


def _bounded_int(text: str) -> int:
    # Checked by its digits before int() reads it: Python refuses past 4,300 digits with a ValueError.
    if len(text.lstrip("-")) > 19 or abs(value := int(text)) >= _MAX_INTEGER:
        digits = len(text.lstrip("-"))
        raise _NumberError(f"an integer of {digits:,} digits ({text[:12]}...), larger than any report holds")
    return value


def _no_constant(text: str) -> float:
    raise _NumberError(f"the bare constant {text} (a report writes it as the string {text.lower()!r})")


def report_from_dict(document: Any, where: str = "the report") -> Report:
    """A Report from the JSON-ready data ``Report.to_dict`` gives (or an older document of the same version).

    Raises:
        ReportFileError: as load_report.
    """
    if not isinstance(document, dict) or "schema_version" not in document:
        raise ReportFileError(
            f"{where} is not a bn-inspect report (no schema_version)",
            "Give a report written by `bn-inspect inspect --format json`",
        )
    kind = document.get("kind", "inspect")
    if kind != "inspect":
        raise ReportFileError(
            f"{where} is a {_shown(kind)} document, which holds no per-layer statistics",
            "Give a report written by `bn-inspect inspect --format json` or `bn-inspect check --write-baseline`",
        )
    version = document["schema_version"]
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise ReportFileError(
            f"{where} has schema_version {_shown(version)}, and this bn-inspect reads only version "
            f"{', '.join(map(str, READABLE_VERSIONS))}",
            "Write the report again with this bn-inspect, or read it with the bn-inspect that wrote it",
        )
    report: Report = _convert(document, Report, "")
    return dataclasses.replace(report, schema_version=SCHEMA_VERSION)


def _shown(value: Any) -> str:
    return repr(value)[:40]


def _fail(where: str, expected: str, value: Any) -> ReportFileError:
    return ReportFileError(
        f"the report's field {where or '(top)'} should be {expected}, not {_shown(value)}",
        "Give a report written by `bn-inspect inspect --format json`, unchanged",
    )


def _convert(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the type ``hint`` of a report record, checked; ``where`` is its JSON path."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(get_args(hint)):
            return None
        return _convert(value, options[0], where)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _record(value, hint, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise _fail(where, "a list", value)
        item = get_args(hint)[0]
        if item in (int, float) and all(type(v) in _PLAIN_NUMBERS[item] for v in value):
            # Per-channel lists are most of a report: plain finite numbers skip the per-item path.
            numbers = tuple(map(item, value))
            if item is int or all(map(math.isfinite, numbers)):
                return numbers
        return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float:
        if isinstance(value, str) and value in _NONFINITE:
            return _NONFINITE[value]
        if isinstance(value, int | float) and not isinstance(value, bool):
            # A literal too large for a float (1e999) reads as inf: reports write "inf" for that.
            if not math.isfinite(value):
                raise _fail(where, 'a finite number (or "nan", "inf", "-inf")', value)
            return float(value)
        raise _fail(where, "a number", value)
    if hint is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise _fail(where, "an integer", value)
    if hint is bool and not isinstance(value, bool):
        raise _fail(where, "true or false", value)
    if hint in (str, Untrusted) and not isinstance(value, str):
        raise _fail(where, "a string", value)
    return Untrusted(value) if hint is Untrusted else value


# Exactly these types pass as a list's numbers without a closer look (bool is an int, and is refused).
_PLAIN_NUMBERS: dict[type, tuple[type, ...]] = {int: (int,), float: (float, int)}


@functools.cache
def _fields(record: type) -> tuple[tuple[str, Any, bool], ...]:
    """Each field of a record: its name, its type, and whether a document must have it (no default)."""
    hints = get_type_hints(record)
    return tuple(
        (
            item.name,
            hints[item.name],
            item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING,
        )
        for item in dataclasses.fields(record)
    )


def _record(value: Any, record: type, where: str) -> Any:
    """A record dataclass from a JSON object: its fields converted, defaults for those an older
    version lacks, computed extras (mean_shift_z, var_ratio, kind) left out."""
    if not isinstance(value, dict):
        raise _fail(where, "an object", value)
    chosen = {}
    for name, hint, is_required in _fields(record):
        path = f"{where}.{name}" if where else name
        if name in value:
            chosen[name] = _convert(value[name], hint, path)
        elif is_required:
            raise ReportFileError(
                f"the report has no field {path}",
                "Give a report written by `bn-inspect inspect --format json`, unchanged",
            )
    if record is LayerReport:
        _check_channel_lengths(chosen, where)
        _check_moments(chosen.get("moments"), chosen.get("num_channels"), f"{where}.moments")
    return record(**chosen)


def _check_channel_lengths(fields: dict[str, Any], where: str) -> None:
    """Every per-channel list of a layer has one entry per channel: diff and check pair them channel by channel."""
    channels = fields.get("num_channels")
    for name in _PER_CHANNEL:
        values = fields.get(name)
        if values is None:
            continue
        if channels is None and name in _STATISTICS:
            raise ReportFileError(
                f"the report's field {where}.{name} holds {len(values)} values for a layer with no channel count",
                f"{_REPORT_FIX}, unchanged",
            )
        if channels is not None and len(values) != channels:
            raise ReportFileError(
                f"the report's field {where}.{name} holds {len(values)} values, and {where}.num_channels is {channels}",
                f"{_REPORT_FIX}, unchanged",
            )


# Per kind of moments, the per-channel lists it must hold; the others must be null.
_MOMENT_LISTS = {"channel": ("mean", "m2"), "instance": ("mean_sum", "var_sum")}


def _check_moments(moments: LayerMoments | None, channels: int | None, where: str) -> None:
    """A layer's moments are of a known kind, hold counts no run gives negative, and one value per channel."""
    if moments is None:
        return
    if moments.kind not in _MOMENT_LISTS:
        raise _fail(f"{where}.kind", '"channel" or "instance"', moments.kind)
    counts = [moments.count, moments.num_batches, moments.values_per_instance or 0]
    counts += [n for pair in moments.batch_sizes for n in pair]
    if any(n < 0 for n in counts) or any(len(pair) != 2 for pair in moments.batch_sizes):
        raise _fail(where, "non-negative counts and [samples, batches] pairs", "a negative count or a broken pair")
    if moments.kind == "instance" and moments.values_per_instance is None:
        raise _fail(f"{where}.values_per_instance", "an integer", None)
    for name in _MOMENT_LISTS[moments.kind]:
        values = getattr(moments, name)
        if values is None or channels is None or len(values) != channels:
            raise ReportFileError(
                f"the report's field {where}.{name} holds {'no' if values is None else len(values)} values, "
                f"and the layer's num_channels is {channels}",
                f"{_REPORT_FIX}, unchanged",
            )


def write_report(path: Path, report: Report, *, force: bool = False) -> None:
    """Write ``report`` as the JSON document ``inspect --format json`` writes, as a baseline (the
    writer policy: at the run's commit, never over an existing file unless ``force``)."""
    text = json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n"
    write_output(path, text, Destination.BASELINE, force=force)
