"""Files written whole or not at all: a temporary file beside the target, synced, renamed over it.

The one writer of every file bn-inspect produces (reports and recalibrated models). A target
that is not a regular file (a named pipe, a device node, a socket) is refused rather than
replaced, and so is any file the run reads, by inode, whatever path names it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from bn_inspect.errors import Interrupted, OutputError

_KINDS = {
    stat.S_IFIFO: "a named pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


@dataclass(frozen=True)
class ProtectedFile:
    """A file the run reads, which an output must never replace.

    Attributes:
        role: how the error names it, e.g. ``the --input file``.
        path: the file.
    """

    role: str
    path: Path


def check_target(target: Path, protected: Sequence[ProtectedFile] = (), *, option: str = "--output") -> None:
    """Refuse a target that cannot be written whole or would replace something it must not.

    Args:
        target: the file to be written.
        protected: files the run reads; a target that is one of them (the same inode, through
            any spelling, symlink or hard link) is refused.
        option: how the errors name the target (``--output``, or ``output`` through the API).

    Raises:
        OutputError: the target is a directory, a pipe, a device or a socket, one of
            ``protected``, or its folder is missing or not writable.
    """
    _refuse_special(target, option)
    folder = target.parent.resolve()
    if not folder.is_dir():
        raise OutputError(f"{option} {target}: folder {folder} does not exist", "Create it or choose another path")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{option} {target}: folder {folder} is not writable", "Choose a writable folder")
    identity = _identity(target)
    if identity is None:
        return
    for entry in protected:
        if _identity(entry.path) == identity:
            raise OutputError(
                f"{option} {target} is {entry.role} {entry.path}, which this run reads",
                "Choose another path for the output",
            )


@contextmanager
def atomic_file(target: Path, *, overwrite: bool = True, option: str = "--output") -> Iterator[BinaryIO]:
    """A binary stream whose bytes become ``target`` when the block ends without an exception.

    The stream is a temporary file in the target's folder; at the end it is flushed, synced and
    renamed over the target, so a reader sees the old file or the whole new one. A new file gets
    the mode an ordinary write would give it (0666 less the umask); a replaced one keeps its mode.
    The temporary file is removed on every way out: an error, KeyboardInterrupt, or the
    ``Interrupted`` that the CLI raises on SIGINT and SIGTERM.

    Args:
        target: the file to write.
        overwrite: replace an existing target; when False, a target that appears meanwhile is
            not replaced either (the temporary file is hard-linked into place).
        option: how the errors name the target.

    Raises:
        OutputError: the folder cannot take the file, the target became a pipe, device or
            other non-regular file meanwhile, or it exists and ``overwrite`` is False.
    """
    folder = target.parent.resolve()
    try:
        descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as error:
        raise OutputError(
            f"cannot write {option} {target}: {error.strerror}", "Check the folder and free space"
        ) from error
    try:
        with os.fdopen(descriptor, "wb") as stream:
            # mkstemp makes the file private (0600); give it what an ordinary write would.
            os.fchmod(stream.fileno(), _mode_for(target))
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        # The target was checked before the run; it may have become a pipe or a device since.
        _refuse_special(target, option)
        if overwrite:
            os.replace(temporary, target)
        else:
            _link_new(temporary, target, option)
        _fsync_folder(folder)
    except OSError as error:
        raise OutputError(
            f"cannot write {option} {target}: {error.strerror or error}", "Check the folder and free space"
        ) from error
    except Exception as error:
        # torch's zip writer reports an interrupt inside its write callback as a RuntimeError.
        interrupt = interruption(error)
        if interrupt is not None:
            raise interrupt from None
        raise
    finally:
        with suppress(OSError):
            os.unlink(temporary)


def write_text(target: Path, text: str, *, option: str = "--output") -> None:
    """Write ``text`` (UTF-8) to ``target`` through ``atomic_file``."""
    with atomic_file(target, option=option) as stream:
        stream.write(text.encode("utf-8"))


def interruption(error: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or ``Interrupted`` that ``error`` is, or was raised while handling."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, (KeyboardInterrupt, Interrupted)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return None
    return status.st_dev, status.st_ino


def _refuse_special(target: Path, option: str) -> None:
    try:
        mode = os.stat(target).st_mode
    except (OSError, ValueError):
        return
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        fix = "Give a file path" if stat.S_ISDIR(mode) else "Give the path of a regular file, or a new one"
        raise OutputError(f"{option} {target} is {kind}", fix)


def _mode_for(target: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _link_new(temporary: str, target: Path, option: str) -> None:
    # A hard link never replaces an existing file, so a target created after the check is not
    # overwritten either; filesystems without hard links fall back to check-then-rename.
    exists = OutputError(f"{option} {target} already exists", "Pass --force to replace it, or choose another path")
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise exists from None
    except OSError:
        if os.path.lexists(target):
            raise exists from None
        os.replace(temporary, target)


def _fsync_folder(folder: Path) -> None:
    # The rename itself is durable only once the folder is synced (POSIX; Windows has no folder fds).
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
