"""The one writer policy: every output is staged whole, checked against the run's manifest, committed together.

Every file bn-inspect produces (``--output``, ``--report``, ``--write-baseline``, recalibrate's
model) is written to a temporary file beside its target, synced, and renamed into place only when
the command has finished: all temporaries first, the renames last, so that a failed or interrupted
run leaves either every output or, as exactly as it can say, the ones it names. A target is
refused when it is not a regular file (a named pipe, a device node, a socket), when it is any file
the run reads (by inode, whatever path names it: the run manifest), when another output of the run
already goes there, and, without ``--force``, when it exists: a new file is linked into place, which
never replaces a file created meanwhile.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import BinaryIO

from bn_inspect.boundary.reading import Identity, current_manifest, identity_of, kind_of
from bn_inspect.errors import Interrupted, OutputError


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


def _refuse_special(target: Path, option: str) -> None:
    try:
        mode = os.stat(target).st_mode
    except (OSError, ValueError):
        return
    if not stat.S_ISREG(mode):
        kind = kind_of(mode)
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
    # O_DIRECTORY: a folder swapped for a named pipe meanwhile fails here instead of blocking.
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class Destination(str, Enum):
    """What an output is: the writers of the surface registry. A new writer adds its member here."""

    RESULT = "result"
    PAGE = "page"
    BASELINE = "baseline"
    MODEL = "model"
    TIMELINE = "timeline"

    @property
    def option(self) -> str:
        """How the CLI spells the option that names this output."""
        return _OPTIONS[self]


_OPTIONS = {
    Destination.RESULT: "--output",
    Destination.PAGE: "--report",
    Destination.BASELINE: "--write-baseline",
    Destination.MODEL: "--output",
    Destination.TIMELINE: "timeline",
}


@dataclass(frozen=True)
class _Staged:
    target: Path
    temporary: str
    force: bool
    option: str
    # The temporary file's (device, inode): the target has it once the output is in place.
    identity: Identity


@dataclass
class OutputSet:
    """The outputs of one run: staged as they are produced, renamed into place together by ``commit``.

    Attributes:
        written: the targets renamed into place so far, in order; what an interrupt reports.
        on_placed: told each target as soon as it is in place (an observer of the commit).
    """

    staged: list[_Staged] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    on_placed: Callable[[Path], None] | None = None

    @contextmanager
    def stage(
        self, target: Path, destination: Destination, *, force: bool, option: str | None = None
    ) -> Iterator[BinaryIO]:
        """A binary stream whose bytes become ``target`` at ``commit`` (when the block ends without an exception).

        Raises:
            OutputError: ``target`` is refused (see ``check_output_target``) or cannot be written.
        """
        option = option or destination.option
        self._check_new(target, option)
        check_output_target(target, destination, force=force, option=option)
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
                status = os.fstat(stream.fileno())
                yield stream
                stream.flush()
                os.fsync(stream.fileno())
        except OSError as error:
            _remove(temporary)
            raise OutputError(
                f"cannot write {option} {target}: {error.strerror or error}", "Check the folder and free space"
            ) from error
        except BaseException as error:
            _remove(temporary)
            # torch's zip writer reports an interrupt inside its write callback as a RuntimeError.
            interrupt = interruption(error)
            if interrupt is not None and interrupt is not error:
                raise interrupt from None
            raise
        self.staged.append(_Staged(target, temporary, force, option, (status.st_dev, status.st_ino)))

    def commit(self) -> None:
        """Rename every staged output into place, after checking them all again.

        Raises:
            OutputError: a target became unwritable, an input of the run, or (without ``--force``)
                appeared meanwhile; the message names the outputs already in place.
        """
        staged, self.staged = self.staged, []
        earlier = list(self.written)
        try:
            for entry in staged:
                _refuse_target(entry.target, entry.option, force=entry.force)
            for entry in staged:
                self._place(entry)
        except OutputError as error:
            if self.written:
                raise OutputError(f"{error.what}; written before that: {_listed(self.written)}", error.fix) from error
            raise
        except BaseException:
            # An interrupt can land between a rename and its record: what is in place says what was written.
            self.written = [
                *earlier,
                *(entry.target for entry in staged if identity_of(entry.target) == entry.identity),
            ]
            raise
        finally:
            for entry in staged:
                _remove(entry.temporary)

    def _place(self, entry: _Staged) -> None:
        _refuse_special(entry.target, entry.option)
        _refuse_input(entry.target, entry.option)
        try:
            if entry.force:
                os.replace(entry.temporary, entry.target)
            else:
                _link_new(entry.temporary, entry.target, entry.option)
        except OSError as error:
            raise OutputError(
                f"cannot write {entry.option} {entry.target}: {error.strerror or error}",
                "Check the folder and free space",
            ) from error
        self.written.append(entry.target)
        _fsync_folder(entry.target.parent.resolve())
        if self.on_placed is not None:
            self.on_placed(entry.target)

    def discard(self) -> None:
        """Remove every staged temporary file: the run failed, so none of its outputs appears."""
        staged, self.staged = self.staged, []
        for entry in staged:
            _remove(entry.temporary)

    def interrupted_line(self) -> str:
        """What an interrupt leaves, said exactly: nothing, or the outputs already in place."""
        if not self.written:
            return "interrupted; nothing written."
        return f"interrupted; written before the interrupt: {_listed(self.written)}; nothing else."

    def _check_new(self, target: Path, option: str) -> None:
        identity = identity_of(target)
        for entry in self.staged:
            if entry.target == target or (identity is not None and identity_of(entry.target) == identity):
                raise OutputError(
                    f"{option} {target} is also {entry.option} of this run", "Give each output its own path"
                )


_CURRENT_OUTPUTS: ContextVar[OutputSet | None] = ContextVar("bn_inspect_outputs", default=None)


@contextmanager
def run_outputs(outputs: OutputSet | None = None) -> Iterator[OutputSet]:
    """Collect the outputs of the run in this block (in ``outputs``, or a new set); the caller commits
    them, anything left uncommitted is discarded."""
    outputs = OutputSet() if outputs is None else outputs
    token = _CURRENT_OUTPUTS.set(outputs)
    try:
        yield outputs
    finally:
        _CURRENT_OUTPUTS.reset(token)
        outputs.discard()


@contextmanager
def output_file(
    target: Path, destination: Destination, *, force: bool, option: str | None = None
) -> Iterator[BinaryIO]:
    """A binary stream that becomes ``target``: at the run's commit, or at the block's end outside a run."""
    outputs = _CURRENT_OUTPUTS.get()
    if outputs is not None:
        with outputs.stage(target, destination, force=force, option=option) as stream:
            yield stream
        return
    with run_outputs() as alone:
        with alone.stage(target, destination, force=force, option=option) as stream:
            yield stream
        alone.commit()


def write_output(target: Path, text: str, destination: Destination, *, force: bool, option: str | None = None) -> None:
    """Write ``text`` (UTF-8) to ``target`` through ``output_file``."""
    with output_file(target, destination, force=force, option=option) as stream:
        stream.write(text.encode("utf-8"))


def check_output_target(target: Path, destination: Destination, *, force: bool, option: str | None = None) -> None:
    """Refuse, before anything is written, a target that the policy would refuse at commit.

    Raises:
        OutputError: the target is a directory, a pipe, a device or a socket; a file this run reads
            (the manifest so far); it exists and ``force`` is False; or its folder is missing or
            not writable.
    """
    option = option or destination.option
    _refuse_special(target, option)
    folder = target.parent.resolve()
    if not folder.is_dir():
        raise OutputError(f"{option} {target}: folder {folder} does not exist", "Create it or choose another path")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{option} {target}: folder {folder} is not writable", "Choose a writable folder")
    _refuse_input(target, option)
    _refuse_target(target, option, force=force)


def _refuse_input(target: Path, option: str) -> None:
    identity = identity_of(target)
    if identity is None:
        return
    entry = current_manifest().entry_for(identity)
    if entry is not None:
        raise OutputError(
            f"{option} {target} is {entry.source.value} {entry.path}, which this run reads",
            "Choose another path for the output",
        )
    module = _imported_module(identity)
    if module is not None:
        raise OutputError(
            f"{option} {target} is the source of the Python module {module}, which this run imported",
            "Choose another path for the output",
        )


def _imported_module(identity: Identity) -> str | None:
    """The module of this process whose source file is ``identity``, if any.

    The manifest holds the --arch and --data sources, but the code they import (a package's
    ``__init__.py``, a helper module), and what a trusted pickle imports, is read by Python's own
    import system: every module loaded in this process counts as read.
    """
    for name, module in list(sys.modules.items()):
        source = getattr(module, "__file__", None)
        if isinstance(source, str) and identity_of(Path(source)) == identity:
            return name
    return None


def _refuse_target(target: Path, option: str, *, force: bool) -> None:
    if not force and os.path.lexists(target):
        raise OutputError(f"{option} {target} already exists", "Pass --force to replace it, or choose another path")


def _listed(paths: Sequence[Path]) -> str:
    return ", ".join(str(path) for path in paths)


def _remove(temporary: str) -> None:
    with suppress(OSError):
        os.unlink(temporary)


class AppendFile:
    """A new file written a line at a time while the run goes on: what a kill leaves is every whole line.

    Unlike the staged outputs, it exists from the start (a timeline is read while training runs), so
    the policy is applied at creation instead: see ``create_append_file``.
    """

    def __init__(self, target: Path, descriptor: int, option: str) -> None:
        self.target = target
        self._descriptor: int | None = descriptor
        self._option = option

    def write_line(self, line: str) -> None:
        """Append ``line`` and a newline in one write, straight to the file (no buffer a kill could lose).

        Raises:
            OutputError: the file is closed or cannot be written (a full disk).
        """
        data = (line + "\n").encode("utf-8")
        try:
            while data:
                written = os.write(self._open_descriptor(), data)
                data = data[written:]
        except OSError as error:
            raise OutputError(
                f"cannot write {self._option} {self.target}: {error.strerror or error}",
                "Check the folder and free space",
            ) from error

    def sync(self) -> None:
        """Make what was written durable (fsync)."""
        with suppress(OSError):
            os.fsync(self._open_descriptor())

    def close(self) -> None:
        """Sync and close; closing twice does nothing."""
        if self._descriptor is None:
            return
        self.sync()
        descriptor, self._descriptor = self._descriptor, None
        os.close(descriptor)

    def _open_descriptor(self) -> int:
        if self._descriptor is None:
            raise OutputError(f"{self._option} {self.target} is already closed", "Write while the run is open")
        return self._descriptor


def create_append_file(target: Path, destination: Destination, *, option: str | None = None) -> AppendFile:
    """Create ``target`` as a new, empty file for ``AppendFile``'s line-by-line writes.

    The target must not exist in any form: a file there, even one this kind of output wrote, is
    another run's (appending would mix two runs, replacing it would lose one), and a symlink, a named
    pipe, a device or a directory is refused before anything is opened (lstat, so a pipe never blocks
    and a link is never followed). O_EXCL | O_NOFOLLOW closes the race with a file or link created
    after that check.

    Raises:
        OutputError: the target exists (whatever it is), or its folder is missing or not writable.
    """
    option = option or destination.option
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        mode = None
    except (OSError, ValueError) as error:
        raise OutputError(
            f"{option} {target}: {getattr(error, 'strerror', None) or error}", "Give another path"
        ) from error
    if mode is not None:
        raise OutputError(f"{option} {target} already exists{_as_kind(mode)}", _EXISTS_FIX)
    check_output_target(target, destination, force=False, option=option)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(target, flags, 0o666)
    except FileExistsError:
        raise OutputError(f"{option} {target} already exists", _EXISTS_FIX) from None
    except OSError as error:
        raise OutputError(
            f"cannot write {option} {target}: {error.strerror or error}", "Check the folder and free space"
        ) from error
    return AppendFile(target, descriptor, option)


_EXISTS_FIX = "Give each run a new path (a run's timeline is never appended to or replaced)"


def _as_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISLNK(mode):
        return " as a symbolic link"
    return f" as {kind_of(mode)}"


@contextmanager
def stderr_discarded() -> Iterator[None]:
    """File descriptor 2 goes to the null device for the block, and back after.

    For subprocesses whose output is no part of bn-inspect's (a compiler's diagnostics while the
    CPU kernel compiles): they write to the descriptor, past Python's ``sys.stderr``, and
    bn-inspect says what happened in its own note instead.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(sink, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(sink)
