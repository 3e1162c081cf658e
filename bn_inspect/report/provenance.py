"""Where recalibrated statistics came from: the source model, the data and the method, as a record and as JSON.

``recalibrate`` stores the record in the model file it writes (bn_inspect/model/provenance.py);
``check`` and ``inspect`` read it back and say when they run other data. Read back, every string is
``Untrusted`` and the record is bounded (``MAX_RECORD_BYTES``, ``_MAX_TEXT``, ``_MAX_ITEMS``): a
record that breaks a bound or the layout is refused whole (``RecordError``), never half read.
"""

from __future__ import annotations

import json
import os.path
from dataclasses import dataclass
from typing import Any

from bn_inspect.text import Untrusted

RECORD_KIND = "bn-inspect-recalibration"
RECORD_VERSION = 1

# A real record is a few hundred bytes: the paths of the model and the data, and a few options.
MAX_RECORD_BYTES = 64 * 1024
_MAX_TEXT = 4096
_MAX_ITEMS = 64


class RecordError(ValueError):
    """A stored recalibration record that cannot be read; its message says why, in a few words."""


@dataclass(frozen=True)
class RecalibrationData:
    """The data statistics were taken from: what makes two runs see the same values.

    Attributes:
        paths: the data's paths as given (an --input file or folder; a --data spec).
        folder: the absolute working folder the paths were given in, so that runs from other
            folders compare the same files.
        options: the options that change the values, as spelled on the command line
            (``--input-key x``, ``--drop-column id``, ``--resize 32``, ``--crop 28``,
            ``--normalize imagenet``, ``--grayscale``).
        num_samples: how many samples ran (``--batches`` and a folder's content change it).
    """

    paths: tuple[Untrusted, ...]
    folder: Untrusted
    options: tuple[Untrusted, ...]
    num_samples: int

    def describe(self) -> str:
        """``path (N samples, options)`` in one line, inert."""
        said = [f"{self.num_samples:,} sample{'s' if self.num_samples != 1 else ''}"]
        said += [option.inert() for option in self.options]
        return f"{', '.join(path.inert() for path in self.paths)} ({', '.join(said)})"

    def same_as(self, other: RecalibrationData) -> bool:
        """Whether ``other`` names the same data, read the same way, with as many samples."""
        return (self._located(), self.options, self.num_samples) == (other._located(), other.options, other.num_samples)

    def _located(self) -> tuple[str, ...]:
        # A --data spec starts with "--data ", which no join or normalization changes.
        return tuple(os.path.normpath(os.path.join(self.folder.raw, path.raw)) for path in self.paths)


@dataclass(frozen=True)
class RecalibrationProvenance:
    """What a recalibration started from and how it ran.

    Attributes:
        source_model: the path of the model file that was recalibrated, as given (in ``data.folder``).
        source_sha256: the hex SHA-256 of that file's bytes.
        data: the data the new statistics describe.
        method: "sequential" or "precise".
        bn_inspect_version: the version of bn-inspect that wrote the statistics.
    """

    source_model: Untrusted
    source_sha256: Untrusted | None
    data: RecalibrationData
    method: Untrusted
    bn_inspect_version: Untrusted

    def to_json(self) -> dict[str, Any]:
        """The record as stored in a model file and as the ``provenance`` of recalibrate's JSON."""
        return {
            "kind": RECORD_KIND,
            "record_version": RECORD_VERSION,
            "bn_inspect_version": self.bn_inspect_version.raw,
            "method": self.method.raw,
            "source_model": self.source_model.raw,
            "source_sha256": None if self.source_sha256 is None else self.source_sha256.raw,
            "data": {
                "paths": [path.raw for path in self.data.paths],
                "folder": self.data.folder.raw,
                "options": [option.raw for option in self.data.options],
                "num_samples": self.data.num_samples,
            },
        }

    def note_for(self, current: RecalibrationData) -> str | None:
        """The one line to say when ``current`` is not the data these statistics came from, else None."""
        if self.data.same_as(current):
            return None
        return (
            f"statistics were recalibrated by bn-inspect on {self.data.describe()}; this run uses {current.describe()}"
        )


def parse_record(payload: bytes) -> RecalibrationProvenance:
    """The record stored as ``payload`` (UTF-8 JSON of ``to_json``'s layout), every string Untrusted.

    Raises:
        RecordError: over ``MAX_RECORD_BYTES``, not UTF-8 JSON, or not the layout (another kind,
            another record version, a missing or mistyped field, a string or list over its bound).
    """
    if len(payload) > MAX_RECORD_BYTES:
        raise RecordError(f"{len(payload):,} bytes, over the {MAX_RECORD_BYTES:,}-byte budget")
    try:
        document = json.loads(payload.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise RecordError(f"not JSON ({type(error).__name__})") from None
    if not isinstance(document, dict) or document.get("kind") != RECORD_KIND:
        raise RecordError("not a bn-inspect recalibration record")
    if document.get("record_version") != RECORD_VERSION:
        raise RecordError("a record version this bn-inspect does not know")
    data = document.get("data")
    if not isinstance(data, dict):
        raise RecordError("no data entry")
    sha256 = document.get("source_sha256")
    return RecalibrationProvenance(
        source_model=_text(document, "source_model"),
        source_sha256=None if sha256 is None else _text(document, "source_sha256"),
        data=RecalibrationData(
            _texts(data, "paths"), _text(data, "folder"), _texts(data, "options"), _count(data, "num_samples")
        ),
        method=_text(document, "method"),
        bn_inspect_version=_text(document, "bn_inspect_version"),
    )


def _refuse_constant(name: str) -> object:
    raise ValueError(name)


def _text(document: dict[str, Any], key: str) -> Untrusted:
    value = document.get(key)
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise RecordError(f"{key} is not a string of at most {_MAX_TEXT} characters")
    return Untrusted(value)


def _texts(document: dict[str, Any], key: str) -> tuple[Untrusted, ...]:
    values = document.get(key)
    if not isinstance(values, list) or len(values) > _MAX_ITEMS:
        raise RecordError(f"{key} is not a list of at most {_MAX_ITEMS} strings")
    return tuple(_text({key: value}, key) for value in values)


def _count(document: dict[str, Any], key: str) -> int:
    value = document.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RecordError(f"{key} is not a count")
    return value
