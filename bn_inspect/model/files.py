"""What a model file is, judged by its bytes: the one opener for it, kind detection, bounded zip checks, corrupt-file errors."""

from __future__ import annotations

import zipfile
from contextlib import AbstractContextManager
from enum import Enum
from itertools import pairwise
from pathlib import Path

from bn_inspect.boundary.reading import OpenedInput, Source, open_checked
from bn_inspect.errors import ModelFileError


class FileKind(str, Enum):
    """What a model file is, judged by its bytes, never by its extension."""

    TORCH_SAVE = "torch.save"
    TORCHSCRIPT = "torchscript"
    TORCH_EXPORT = "torch.export"
    SAFETENSORS = "safetensors"
    LEGACY_PICKLE = "legacy-pickle"
    ONNX = "onnx"


def open_model_file(path: Path) -> AbstractContextManager[OpenedInput]:
    """The model file opened through the boundary's opener: a regular file, recorded in the run's manifest.

    No size budget: checkpoints of many gigabytes are ordinary, and every reader below is bounded
    by the file's own size (the zip checks by an inflation budget).

    Raises:
        ModelFileError: the path is missing, unreadable, a directory, a pipe, a device or a socket.
    """
    return open_checked(
        path, Source.MODEL, noun="model file", error=ModelFileError, fix="Give the path of a saved model file"
    )


def detect_file_kind(path: Path) -> FileKind:
    """``file_kind`` of the file at ``path``, opened for the purpose.

    Raises:
        ModelFileError: as open_model_file and file_kind.
    """
    with open_model_file(path) as opened:
        return file_kind(opened)


def file_kind(opened: OpenedInput) -> FileKind:
    """Classify the opened model file from its first bytes and, for zip archives, its entry names.

    Raises:
        ModelFileError: the file is empty, corrupt or of no known kind.
    """
    path = opened.path
    with opened.stream() as stream:
        head = stream.read(16)
        if not head:
            raise ModelFileError(f"model file {path} is empty", "Re-save or re-download it")
        try:
            is_zip = zipfile.is_zipfile(stream)
        except Exception as error:
            # A damaged zip64 locator (several disks) makes is_zipfile itself raise.
            raise ModelFileError(
                f"model file {path} is a damaged zip archive ({type(error).__name__})", "Re-save or re-download it"
            ) from error
    if is_zip:
        return _zip_kind(opened)
    if head.startswith(b"PK"):
        raise ModelFileError(f"model file {path} is a damaged or truncated zip archive", "Re-save or re-download it")
    if len(head) >= 9 and head[8:9] == b"{":
        header_size = int.from_bytes(head[:8], "little")
        if 0 < header_size <= opened.size - 8:
            return FileKind.SAFETENSORS
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return FileKind.LEGACY_PICKLE
    if looks_like_onnx(head):
        return FileKind.ONNX
    raise ModelFileError(
        f"{path} is not a PyTorch or ONNX model file (no zip archive, pickle, safetensors or ONNX header)",
        "Give a file written by torch.save, torch.jit.save, torch.export.save, safetensors or torch.onnx.export",
    )


# The tag bytes a serialized ONNX ModelProto's second field may start with (fields 2 to 8: producer
# name and version, domain, model version, doc string, graph, opset import); serializers write
# fields in number order, after field 1, ir_version, a small varint.
_ONNX_SECOND_FIELD_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42})


def looks_like_onnx(head: bytes) -> bool:
    """True when ``head`` opens like a serialized ONNX ModelProto."""
    return len(head) >= 3 and head[0] == 0x08 and 0 < head[1] < 0x80 and head[2] in _ONNX_SECOND_FIELD_TAGS


def _zip_kind(opened: OpenedInput) -> FileKind:
    path, file_size = opened.path, opened.size
    try:
        with opened.stream() as stream, zipfile.ZipFile(stream) as archive:
            names = archive.namelist()
            _check_entry_extents(archive, path, file_size)
            # A flipped byte in a tensor payload loads silently; the CRC check catches it.
            broken = _first_failing_crc(archive, path, file_size)
    except ModelFileError:
        raise
    except Exception as error:  # unsupported versions, flags, methods: all damage
        raise ModelFileError(
            f"model file {path} is a damaged zip archive ({error})", "Re-save or re-download it"
        ) from error
    if broken is not None:
        raise ModelFileError(
            f"model file {path} is corrupt: entry {broken} fails its CRC check", "Re-save or re-download it"
        )
    parts = {part for name in names for part in name.split("/")[1:2]}
    # Only the archive's top-level entries count: TorchScript keeps user code under code/, whose
    # module paths (code/__torch__/tests/models/...) may contain any folder name.
    if "archive_format" in parts or "models" in parts:
        return FileKind.TORCH_EXPORT
    if "code" in parts or "constants.pkl" in parts:
        return FileKind.TORCHSCRIPT
    if "data.pkl" in parts:
        return FileKind.TORCH_SAVE
    raise ModelFileError(
        f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl, code/ or archive_format)",
        "Give a file written by torch.save, torch.jit.save or torch.export.save",
    )


# A zip entry's local header is at least this long: its data starts no earlier than 30 bytes after
# the header's offset.
_LOCAL_HEADER_SIZE = 30


# Compressed (deflated, bzip2, lzma) entries may declare at most this many inflated bytes per byte of
# the archive, plus the floor below. torch.save, torch.jit.save and torch.export.save store entries
# uncompressed, so their CRC check costs one read of the file; a re-zipped checkpoint compresses
# tensors a few times at most, and the floor leaves room for all-zero buffers, which compress ~1000x.
_MAX_INFLATION_RATIO = 16


_INFLATION_FLOOR = 64 * 2**20


_CHUNK_SIZE = 2**20


def _check_entry_extents(archive: zipfile.ZipFile, path: Path, file_size: int) -> None:
    """Refuse entries that share bytes, and compressed entries that declare more than the budget.

    With no two entries overlapping, their compressed bytes add up to at most the file's size, so
    together with the per-entry cap on inflated bytes (each entry yields at most its declared size)
    the CRC check inflates at most the budget. A zip bomb whose many central-directory records all
    point at one highly compressed entry is refused here before anything is inflated.
    """
    entries = sorted(archive.infolist(), key=lambda entry: entry.header_offset)
    for before, after in pairwise(entries):
        if before.header_offset + _LOCAL_HEADER_SIZE + before.compress_size > after.header_offset:
            raise ModelFileError(
                f"model file {path} is a malformed zip archive: entries {before.filename} and {after.filename} overlap",
                "Re-save or re-download it",
            )
    if entries and entries[-1].header_offset + _LOCAL_HEADER_SIZE + entries[-1].compress_size > archive.start_dir:
        raise ModelFileError(
            f"model file {path} is a malformed zip archive: entry {entries[-1].filename} overlaps the "
            "central directory",
            "Re-save or re-download it",
        )
    declared = sum(entry.file_size for entry in entries if entry.compress_type != zipfile.ZIP_STORED)
    if declared > _inflation_budget(file_size):
        raise ModelFileError(
            f"model file {path} is a zip archive whose compressed entries declare {declared} bytes "
            f"in a file of {file_size} bytes, more than a checkpoint holds (a zip bomb?)",
            "Give a file written by torch.save, which stores tensors uncompressed",
        )


def _inflation_budget(file_size: int) -> int:
    return _MAX_INFLATION_RATIO * file_size + _INFLATION_FLOOR


def _first_failing_crc(archive: zipfile.ZipFile, path: Path, file_size: int) -> str | None:
    """The first entry whose bytes fail their CRC, or None; like ``ZipFile.testzip``, but bounded.

    zipfile stops each entry at its declared size; the running total is checked as well, so no more
    is read than the stored entries' bytes (at most the file) and the compressed entries' budget.
    """
    budget = file_size + _inflation_budget(file_size)
    inflated = 0
    for entry in archive.infolist():
        try:
            with archive.open(entry) as stream:
                while chunk := stream.read(_CHUNK_SIZE):
                    inflated += len(chunk)
                    if inflated > budget:
                        raise ModelFileError(
                            f"model file {path} is a zip archive that inflates past {budget} bytes",
                            "Give a file written by torch.save, which stores tensors uncompressed",
                        )
        except zipfile.BadZipFile:
            return entry.filename
    return None


def file_sha256(opened: OpenedInput) -> str:
    """The hex SHA-256 of the opened file's bytes, read in chunks.

    Raises:
        ModelFileError: the file cannot be read.
    """
    import hashlib

    digest = hashlib.sha256()
    try:
        with opened.stream() as stream:
            while chunk := stream.read(_CHUNK_SIZE):
                digest.update(chunk)
    except OSError as error:
        raise ModelFileError(
            f"cannot read model file {opened.path}: {error.strerror}", "Check its permissions"
        ) from error
    return digest.hexdigest()


def weights_only_reason(error: BaseException) -> str:
    """torch's own reason, without its advice to retry with weights_only=False."""
    text = str(error).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    detail = text.splitlines()[0].strip() if text else ""
    detail = detail.split("(Could this error message be improved?")[0].strip()
    if "weights_only" in detail or len(detail) > 160:
        return ""
    return detail


def corrupt_file_error(path: Path, error: BaseException) -> ModelFileError:
    """The one-line error for a damaged model file, without torch's advice to unpickle it."""
    # torch's own messages often advise weights_only=False; that is wrong advice for a corrupt file.
    detail = weights_only_reason(error)
    described = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
    return ModelFileError(
        f"model file {path} is corrupt or not a PyTorch checkpoint ({described})",
        "Re-save or re-download it",
    )
