"""JSON inspect report files: read back into a Report (the inverse of ``Report.to_dict``) for diff and
check --baseline, and written, atomically, by check --write-baseline.

Reads documents of schema version 1, including those written before a field was added ("kind",
the fingerprints: they read as None or ""). A report comes from a file someone handed over, so every field is checked against the record's type and
anything wrong ends in one ReportFileError naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from bn_inspect.boundary.writing import Destination, write_output
from bn_inspect.errors import ReportFileError
from bn_inspect.report.records import SCHEMA_VERSION, Report
from bn_inspect.text import Untrusted

READABLE_VERSIONS = (1,)
# What json_ready writes for non-finite floats.
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# A JSON object with a key first; a safetensors file has its header's "{" at byte 8 instead.
_JSON_OBJECT = re.compile(rb"^\s*\{\s*\"")


def is_report_file(path: Path) -> bool:
    """Whether ``path`` looks like a JSON report rather than a model file (by its first bytes).

    A file that cannot be read counts as a model file; loading it then says what is wrong.
    """
    try:
        with path.open("rb") as stream:
            head = stream.read(64)
    except OSError:
        return False
    return bool(_JSON_OBJECT.match(head.removeprefix(b"\xef\xbb\xbf"))) and head[8:9] != b"{"


def load_report(path: Path) -> Report:
    """Read an inspect report (``bn-inspect inspect --format json``) back into a Report.

    Raises:
        ReportFileError: the file is missing or not a regular file, not UTF-8 JSON, not an
            inspect report, of an unknown schema version, or holds a field of the wrong type.
    """
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise ReportFileError(f"report {path} {what}", "Give the path of a JSON report written by bn-inspect")
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ReportFileError(
            f"cannot read report {path} as JSON ({type(error).__name__})",
            "Give a report written by `bn-inspect inspect --format json`",
        ) from error
    return report_from_dict(document, str(path))


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
        return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float:
        if isinstance(value, str) and value in _NONFINITE:
            return _NONFINITE[value]
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _fail(where, "a number", value)
    if hint is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise _fail(where, "an integer", value)
    if hint is bool and not isinstance(value, bool):
        raise _fail(where, "true or false", value)
    if hint in (str, Untrusted) and not isinstance(value, str):
        raise _fail(where, "a string", value)
    return Untrusted(value) if hint is Untrusted else value


def _record(value: Any, record: type, where: str) -> Any:
    """A record dataclass from a JSON object: its fields converted, defaults for those an older
    version lacks, computed extras (mean_shift_z, var_ratio, kind) left out."""
    if not isinstance(value, dict):
        raise _fail(where, "an object", value)
    hints = get_type_hints(record)
    chosen = {}
    for item in dataclasses.fields(record):
        path = f"{where}.{item.name}" if where else item.name
        if item.name in value:
            chosen[item.name] = _convert(value[item.name], hints[item.name], path)
        elif item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
            raise ReportFileError(
                f"the report has no field {path}",
                "Give a report written by `bn-inspect inspect --format json`, unchanged",
            )
    return record(**chosen)


def write_report(path: Path, report: Report, *, force: bool = False) -> None:
    """Write ``report`` as the JSON document ``inspect --format json`` writes, as a baseline (the
    writer policy: at the run's commit, never over an existing file unless ``force``)."""
    text = json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n"
    write_output(path, text, Destination.BASELINE, force=force)
