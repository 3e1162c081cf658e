"""The JSON Schema of each document bn-inspect writes, found by the document's ``kind``."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

# Every JSON document names its kind in its "kind" field; the schema file of each ships in this package.
SCHEMA_FILES = {
    "inspect": "report.schema.json",
    "check": "check.schema.json",
    "layers": "layers.schema.json",
    "compare-modes": "compare-modes.schema.json",
    "recalibrate": "recalibrate.schema.json",
    "diff": "diff.schema.json",
    "timeline": "timeline-output.schema.json",
}
# The records of a timeline file (JSON Lines, not a document with a kind): one schema per line.
TIMELINE_RECORD_SCHEMA = "timeline.schema.json"


def timeline_record_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) each line of a timeline file validates against."""
    return _load(TIMELINE_RECORD_SCHEMA)


def _load(name: str) -> dict[str, Any]:
    text = resources.files("bn_inspect.report").joinpath(name).read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def schema(kind: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the documents whose "kind" is ``kind``.

    Raises:
        KeyError: no document has that kind; the message lists the kinds there are.
    """
    if kind not in SCHEMA_FILES:
        raise KeyError(f"no JSON document has kind {kind!r}; the kinds are {', '.join(SCHEMA_FILES)}")
    return _load(SCHEMA_FILES[kind])
