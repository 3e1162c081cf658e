"""Entry points: run() for programs and tests, main() for the console script; errors become exit codes."""

from __future__ import annotations

import signal
import sys
import traceback
import warnings
from collections.abc import Sequence

import typer

from bn_inspect.boundary.reading import run_manifest
from bn_inspect.boundary.writing import OutputSet, interruption, run_outputs
from bn_inspect.cli import commands as _commands  # noqa: F401 (registers the commands with the app)
from bn_inspect.cli import timeline as _timeline  # noqa: F401 (registers `bn-inspect timeline`)
from bn_inspect.cli.app import EXIT_CANNOT_RUN, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, app
from bn_inspect.cli.console import pause_collector
from bn_inspect.errors import BnInspectError, Interrupted
from bn_inspect.text import one_line

# The signal main()'s handler caught during this run(), if any.
_signal_received: int | None = None


def run(argv: Sequence[str], *, outputs: OutputSet | None = None) -> int:
    """Run the CLI on ``argv`` and return the exit code; errors become one line on stderr.

    The run has its own manifest of the files it reads, and its output files are committed together
    when the command returns, a failed check's too; an error or an interrupt discards those not yet
    in place, and an interrupt's line names those that are. ``outputs`` collects them (a caller may
    observe the commit through its ``on_placed``); by default a new set.
    """
    global _signal_received
    # Bare ``bn-inspect`` asks what the tool does: the help, not a usage error.
    argv = argv or ["--help"]
    # Only an option asks for tracebacks: after ``--`` every word is a file name, ``--debug`` included.
    debug = "--debug" in (argv[: argv.index("--")] if "--" in argv else argv)
    _signal_received = None
    outputs = OutputSet() if outputs is None else outputs
    try:
        try:
            with warnings.catch_warnings(record=True) as caught, run_manifest(), run_outputs(outputs):
                warnings.simplefilter("always")
                result = app(args=list(argv), prog_name="bn-inspect", standalone_mode=False)
                if result != EXIT_INTERRUPTED:
                    outputs.commit()
            _print_warnings(caught)
        except BaseException as error:
            code = _interrupted_exit_code(error)
            if code is None:
                raise
            if debug:
                traceback.print_exc()
            print(f"Error: {outputs.interrupted_line()}", file=sys.stderr)
            return code
    except BnInspectError as error:
        if debug:
            traceback.print_exc()
        print(f"Error: {error.line()}", file=sys.stderr)
        return error.exit_code
    except typer.TyperException as error:
        if debug:
            traceback.print_exc()
        format_message = getattr(error, "format_message", None)
        message = format_message() if callable(format_message) else str(error)
        text = one_line(str(message)).replace("Value error, ", "").rstrip(".")
        # "Did you mean 'inspect'?" ends its own sentence.
        end = "" if text.endswith(("?", "!")) else "."
        print(f"Error: {text}{end} See bn-inspect --help.", file=sys.stderr)
        return int(getattr(error, "exit_code", EXIT_CANNOT_RUN))
    except SystemExit as error:
        # Only code bn-inspect was told to run raises this (an --arch module or factory, a trusted
        # pickle): it did not finish, and exit 0 would say that everything was checked.
        if debug:
            traceback.print_exc()
        print(
            f"Error: code run for the model (--arch, or a pickle under --trust-pickle) called exit({one_line(repr(error.code))}) "
            "before bn-inspect finished. Check what that code runs when imported and called.",
            file=sys.stderr,
        )
        return EXIT_CANNOT_RUN
    except Exception as error:
        if _is_out_of_memory(error):
            if debug:
                traceback.print_exc()
            print(
                "Error: the run ran out of memory. Use a smaller batch (--batch-size, or the first dim of "
                "--shape) or smaller images (--resize), or free memory",
                file=sys.stderr,
            )
            return EXIT_CANNOT_RUN
        traceback.print_exc()
        print(
            "Error: bn-inspect hit an internal error (a bug); please report it with the traceback above.",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    if result == EXIT_INTERRUPTED:
        # typer answers a KeyboardInterrupt (SIGINT where main() did not install its handler) with
        # a silent exit 130; no command returns 130 itself.
        print(f"Error: {outputs.interrupted_line()}", file=sys.stderr)
    return int(result) if isinstance(result, int) else EXIT_OK


_QUIET_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    """The warnings of a finished run, one line each, said once with how often.

    Code bn-inspect runs for the user (the model's forward, torch itself, an --arch module) may
    warn; Python would print each as two lines with a source path, which is not the tool's own
    output. A run that failed prints only its error line: that is what needs fixing first. The
    categories Python itself keeps quiet by default (deprecations, imports, resources) stay quiet:
    they speak to the authors of the code that warned, e.g. torch about bn-inspect's torch.jit.save.
    """
    counts: dict[tuple[str, str], int] = {}
    for warning in caught:
        if issubclass(warning.category, _QUIET_BY_DEFAULT):
            continue
        key = (warning.category.__name__, one_line(str(warning.message)))
        counts[key] = counts.get(key, 0) + 1
    for (category, message), count in counts.items():
        times = "" if count == 1 else f", {count:,} times"
        print(f"warning from torch or the model's code ({category}{times}): {message}", file=sys.stderr)


def main() -> None:
    """Console-script entry point."""
    prepare_process()
    sys.exit(run(sys.argv[1:]))


def prepare_process() -> None:
    """What a bn-inspect process sets up before its first run: the collector pause and the signal handlers."""
    pause_collector()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        # A SIGINT ignored by the parent (a background job of a script) stays ignored.
        if signal.getsignal(signal_number) is not signal.SIG_IGN:
            signal.signal(signal_number, _raise_interrupted)
    sys.unraisablehook = _quiet_after_interrupt


def _raise_interrupted(signal_number: int, _frame: object) -> None:
    """Turn SIGINT and SIGTERM into an exception, so that every ``finally`` (temporary files) runs.

    Only the first signal of a run raises: a second one (Ctrl-C twice, a process-group kill on top
    of a forwarded signal) would land in the cleanup the first one started, in finalizers and
    atexit callbacks, where it can only print a traceback.
    """
    global _signal_received
    if _signal_received is not None:
        return
    _signal_received = signal_number
    raise Interrupted(signal_number)


def _quiet_after_interrupt(unraisable: sys.UnraisableHookArgs) -> None:
    """Python's report of an exception no one can catch (a finalizer's, an atexit callback's), kept
    quiet once a signal has ended the run: a DataLoader whose workers the same signal killed then
    complains from its ``__del__``, and the run's one line has said what happened."""
    if _signal_received is None:
        sys.__unraisablehook__(unraisable)


# How torch's CPU allocator says that an allocation failed (it raises RuntimeError, not MemoryError).
_ALLOCATION_FAILED = "can't allocate memory"


def _is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is, or was raised while handling, a failed allocation: the data or the model
    asked for more than the process may have, which no check before the run could see."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, MemoryError) or _ALLOCATION_FAILED in str(current):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _interrupted_exit_code(error: BaseException) -> int | None:
    """128 + the signal number when ``error`` ends a run that a signal interrupted, else None.

    A signal can surface as something else: torch's zip writer turns it into a RuntimeError, a
    forward through TorchScript into a ForwardError; the signal handler's record and the
    exception chain both tell.
    """
    interrupt = interruption(error)
    if isinstance(interrupt, Interrupted):
        return 128 + interrupt.signal_number
    if _signal_received is not None:
        return 128 + _signal_received
    if interrupt is not None:
        return EXIT_INTERRUPTED
    return None
