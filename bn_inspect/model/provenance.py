"""The recalibration record inside a model file: written next to the tensors, read back through the opener, bounded.

Where it lives, so that every loader ignores it and strict ``load_state_dict`` sees no new key:

* a ``torch.save`` archive (state_dict, checkpoint, pickle): one more zip entry,
  ``<archive>/bn_inspect_recalibration.json``, which ``torch.load`` never reads (it opens
  ``data.pkl`` and the storages it names; checked with torch 2.13, weights_only or not);
* TorchScript and torch.export: the extra file ``bn_inspect_recalibration.json`` (``_extra_files`` of
  ``torch.jit.save``, ``extra_files`` of ``torch.export.save``), stored as ``<archive>/extra/...``;
* safetensors: the header metadata entry ``bn_inspect.recalibration`` (strings only, as the format asks).

A legacy (non-zip) pickle has no place for it and gets none.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bn_inspect.boundary.reading import OpenedInput, Source, open_checked
from bn_inspect.errors import BnInspectError, ModelFileError
from bn_inspect.report.provenance import MAX_RECORD_BYTES, RecalibrationProvenance, RecordError, parse_record

RECORD_NAME = "bn_inspect_recalibration.json"
METADATA_KEY = "bn_inspect.recalibration"

# safetensors' own parser refuses headers over 100 MB; one that size is read only to find the metadata.
_MAX_SAFETENSORS_HEADER = 100 * 2**20


@dataclass(frozen=True)
class StoredRecord:
    """What a model file says of its statistics' origin: a record, or why the one it holds was ignored.

    Both are None for a file without a record (any file bn-inspect did not recalibrate).
    """

    record: RecalibrationProvenance | None = None
    ignored_because: str | None = None


def record_bytes(provenance: RecalibrationProvenance) -> bytes:
    """The record as stored: UTF-8 JSON, keys sorted."""
    return json.dumps(provenance.to_json(), sort_keys=True).encode("utf-8")


def with_record_entry(archive: bytes, payload: bytes) -> bytes:
    """A ``torch.save`` zip archive with the record added as one more entry in its top folder."""
    # An in-memory copy of the archive being written, never a file: the opener has nothing to check.
    copy = io.BytesIO(archive)
    with zipfile.ZipFile(copy, "a") as zipped:
        top = zipped.namelist()[0].split("/")[0]
        zipped.writestr(f"{top}/{RECORD_NAME}", payload)
    return copy.getvalue()


def read_stored_record(path: Path) -> StoredRecord:
    """The recalibration record of the model file at ``path``, read through the boundary's opener.

    Never raises for the record itself: a record over the budget, not JSON, or not the layout is
    ignored, with the reason. Where the file cannot be read at all, loading it reports that.
    """
    try:
        with open_checked(path, Source.RECALIBRATION_RECORD, noun="model file", error=ModelFileError) as opened:
            payload = _payload(opened)
        return StoredRecord() if payload is None else StoredRecord(record=parse_record(payload))
    except BnInspectError:
        return StoredRecord()
    except RecordError as error:
        return StoredRecord(ignored_because=str(error))
    except (OSError, zipfile.BadZipFile, ValueError, RecursionError, EOFError, NotImplementedError) as error:
        return StoredRecord(ignored_because=f"it cannot be read ({type(error).__name__})")


def _payload(opened: OpenedInput) -> bytes | None:
    """The stored record's bytes (at most one over the budget), or None where the file holds none.

    Only the zip's central directory and the one entry are read, not the whole file: loading the
    model checks the archive itself (``file_kind``).
    """
    with opened.stream() as stream:
        head = stream.read(9)
        stream.seek(0)
        if zipfile.is_zipfile(stream):
            with zipfile.ZipFile(stream) as archive:
                entries = [e for e in archive.infolist() if e.filename.split("/")[1:] in _RECORD_PATHS]
                if not entries:
                    return None
                if entries[0].file_size > MAX_RECORD_BYTES:
                    raise RecordError(f"{entries[0].file_size:,} bytes, over the {MAX_RECORD_BYTES:,}-byte budget")
                with archive.open(entries[0]) as member:
                    return member.read(MAX_RECORD_BYTES + 1)
    if len(head) == 9 and head[8:9] == b"{":
        return _safetensors_payload(opened)
    return None


# Where in an archive's top folder: torch.save's entries, or the extra files of TorchScript and torch.export.
_RECORD_PATHS = ([RECORD_NAME], ["extra", RECORD_NAME])


def _safetensors_payload(opened: OpenedInput) -> bytes | None:
    with opened.stream() as stream:
        header_size = int.from_bytes(stream.read(8), "little")
        if header_size > min(_MAX_SAFETENSORS_HEADER, opened.size - 8):
            raise RecordError("a safetensors header larger than the file or 100 MB")
        header = json.loads(stream.read(header_size).decode("utf-8"))
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    value = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError("safetensors metadata that is not a string")
    return value.encode("utf-8")
