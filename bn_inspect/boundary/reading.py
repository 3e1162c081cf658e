"""The one opener of every file a run reads: open, then check the opened descriptor, then record it.

Checking a path and then opening it is a race (the path may become a named pipe, a device or
another file in between), and opening a named pipe without O_NONBLOCK blocks until a writer
comes. So a file is opened first, without blocking and without becoming a controlling terminal,
and only the opened descriptor is judged: a regular file, within its size budget. What was opened
is recorded, by device and inode, in the run's manifest, which the writer policy consults so that
no output ever replaces a file the run reads, whatever path names it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import BinaryIO

from bn_inspect.errors import BnInspectError

_SPECIAL_KINDS = {
    stat.S_IFIFO: "a named pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def kind_of(mode: int) -> str:
    """What a file that is not a regular one is, by its ``st_mode``: "a named pipe", "a directory", ..."""
    return _SPECIAL_KINDS.get(stat.S_IFMT(mode), "not a regular file")


class Source(str, Enum):
    """What a file the run reads is to the run: the manifest's roles and the surface registry's readers.

    A new reader adds its member here; tests/surfaces.py then demands its hostile cases.
    """

    MODEL = "the model file"
    MODEL_CONFIG = "the config.json of a model folder"
    MODEL_INDEX = "the weight index of a sharded model folder"
    INPUT_FILE = "the --input file"
    INPUT_SHARD = "a shard of the --input folder"
    IMAGE = "an image of the --input folder"
    ARCH_CODE = "the --arch source"
    DATA_CODE = "the --data source"
    BASELINE = "the --baseline file"
    DIFF_SIDE = "a side of diff"
    MERGE_PART = "a report to merge"
    CONFIG = "the pyproject.toml settings"
    RECALIBRATION_RECORD = "the recalibration record of the model file"
    TIMELINE = "a timeline file"
    ONNX_EXTERNAL_DATA = "an external data file of the ONNX model"


Identity = tuple[int, int]


@dataclass(frozen=True)
class ManifestEntry:
    """One file the run reads: how errors name it and the path it was given by."""

    source: Source
    path: Path


@dataclass
class RunManifest:
    """Every file this run opened or found to read, by (device, inode)."""

    entries: dict[Identity, ManifestEntry] = field(default_factory=dict)

    def record(self, identity: Identity, source: Source, path: Path) -> None:
        """Add a file the run opened (the first role it was read in is the one errors name)."""
        self.entries.setdefault(identity, ManifestEntry(source, path))

    def declare(self, path: Path, source: Source) -> None:
        """Add a file the run will or may read but has not opened (an image found by the folder
        scan, the source of an --arch module); a path that does not exist adds nothing."""
        identity = identity_of(path)
        if identity is not None:
            self.record(identity, source, path)

    def entry_for(self, identity: Identity) -> ManifestEntry | None:
        """The entry of the file with this identity, or None when the run does not read it."""
        return self.entries.get(identity)


_CURRENT: ContextVar[RunManifest | None] = ContextVar("bn_inspect_run_manifest", default=None)


def current_manifest() -> RunManifest:
    """The manifest of the run in progress; outside a run, an empty one that nothing keeps.

    Nothing is kept outside a run so that one Python API call's reads never constrain the next
    call's writes (a file read earlier in a long-lived process may be a legitimate output later).
    """
    return _CURRENT.get() or RunManifest()


@contextmanager
def run_manifest() -> Iterator[RunManifest]:
    """The manifest of the run in this block: the run in progress if there is one, else a new one.

    Joining lets an API entry point that reads and writes (``save_like``) open its own run and still
    see everything a CLI run around it has read.
    """
    active = _CURRENT.get()
    if active is not None:
        yield active
        return
    manifest = RunManifest()
    token = _CURRENT.set(manifest)
    try:
        yield manifest
    finally:
        _CURRENT.reset(token)


def identity_of(path: Path) -> Identity | None:
    """(device, inode) of the file ``path`` names, symlinks followed; None when there is none."""
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return None
    return status.st_dev, status.st_ino


@dataclass(frozen=True)
class OpenedInput:
    """A regular file opened for reading, checked through its descriptor and recorded.

    Attributes:
        path: the path the user gave; for messages only, never reopened.
        descriptor: the open descriptor; closed when ``open_checked``'s block ends.
        size: its size in bytes when it was opened.
        source: what the file is to the run.
    """

    path: Path
    descriptor: int
    size: int
    source: Source

    def stream(self) -> BinaryIO:
        """A new binary stream on the opened file, from its start; closing it leaves ``descriptor`` open."""
        duplicate = os.dup(self.descriptor)
        os.lseek(duplicate, 0, os.SEEK_SET)
        return os.fdopen(duplicate, "rb")

    def read_bytes(self) -> bytes:
        """The whole file (already within its size budget)."""
        with self.stream() as stream:
            return stream.read(self.size + 1)

    def library_path(self) -> str:
        """A path that names the opened file itself, for libraries that only take paths.

        On Linux, /proc/self/fd/N opens the very inode that was checked, even if the user's path
        now names something else; elsewhere the user's path, once it is checked to still name it.
        """
        proc_path = f"/proc/self/fd/{self.descriptor}"
        if os.path.exists(proc_path):
            return proc_path
        status = os.fstat(self.descriptor)
        if identity_of(self.path) != (status.st_dev, status.st_ino):
            raise BnInspectError(f"{self.path} was replaced while bn-inspect read it", "Run again")
        return str(self.path)


@contextmanager
def open_checked(
    path: Path,
    source: Source,
    *,
    noun: str,
    error: type[BnInspectError],
    max_bytes: int | None = None,
    fix: str = "Give the path of a regular file",
) -> Iterator[OpenedInput]:
    """Open ``path`` for reading, check the opened descriptor, record it, and close it after the block.

    Args:
        path: the file.
        source: what it is to the run (its role in the manifest).
        noun: how messages name it, e.g. ``model file`` or ``report``.
        error: the exception raised for a file that cannot be used.
        max_bytes: the size budget; a larger file is refused before any byte is read.
        fix: the advice for a path that is not a regular file.

    Raises:
        error: the path is missing, unreadable, not a regular file, or over ``max_bytes``.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{noun} {path} does not exist", "Check the path") from None
    except IsADirectoryError:
        raise error(f"{noun} {path} is a directory", fix) from None
    except (OSError, ValueError) as failure:
        reason = getattr(failure, "strerror", None) or str(failure)
        raise error(f"cannot read {noun} {path}: {reason}", "Check the path and its permissions") from failure
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            kind = kind_of(status.st_mode)
            what = (
                f"{noun} {path} is {kind}" if kind == "a directory" else f"{noun} {path} is {kind}, not a regular file"
            )
            raise error(what, fix)
        if max_bytes is not None and status.st_size > max_bytes:
            raise error(
                f"{noun} {path} is {status.st_size:,} bytes, over the {max_bytes:,}-byte budget for it",
                "Check that it is the right file",
            )
        if hasattr(os, "O_NONBLOCK"):
            # Regular files ignore O_NONBLOCK; cleared so that no library sees a surprising flag.
            os.set_blocking(descriptor, True)
        current_manifest().record((status.st_dev, status.st_ino), source, path)
        try:
            yield OpenedInput(path, descriptor, status.st_size, source)
        except OSError as failure:
            # A read of the opened file that fails (EIO from a failing disk, a file under /proc that
            # opens but cannot be read) names no file; an error naming another path is not ours.
            if failure.filename is not None:
                raise
            raise error(
                f"cannot read {noun} {path}: {failure.strerror or failure}", "Check the file and the disk it is on"
            ) from failure
    finally:
        os.close(descriptor)
