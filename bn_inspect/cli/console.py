"""What the user sees of a run besides its result: notes and warnings on stderr, a progress bar.

Also the garbage-collector pause that main() starts and the end of startup lifts.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from bn_inspect.options import RunOptions
from bn_inspect.text import inert

if TYPE_CHECKING:
    from bn_inspect.analyses.session import RunObserver
    from bn_inspect.data.batch import Batch

# Off a terminal, a run of no known length says it is alive after its first batches, then once
# every so many seconds: a CI log shows an endless --data iterable working, not hanging, and a
# run of fast batches does not fill the log.
PROGRESS_FIRST_BATCHES = 100
PROGRESS_EVERY_SECONDS = 60.0

# Only main() sets this: a CLI process owns its garbage collector, a program that calls run() does not.
_is_collector_paused = False


class ConsoleObserver:
    """Notes and warnings on stderr as plain text (never markup), and a progress bar on a terminal."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def note(self, message: str) -> None:
        """A dim line on stderr, unless quiet."""
        if not self.quiet:
            self.warn(message)

    def warn(self, message: str) -> None:
        """A dim line on stderr."""
        from rich.console import Console
        from rich.text import Text

        # A note quotes the model's path and layer names: as Text, never as markup; control characters escaped.
        Console(stderr=True, highlight=False, soft_wrap=True).print(Text(inert(message), style="dim"))

    def progress(self, batches: Iterator[Batch], total: int | None) -> Iterator[Batch]:
        """A rich progress bar on stderr while batches run; none when quiet or for one batch.

        Off a terminal, a line now and then when the number of batches is not known, else nothing.
        """
        if self.quiet or total == 1 or not sys.stderr.isatty():
            yield from batches if self.quiet or total is not None else self._progress_lines(batches)
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("batches"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("batches", total=total)
            for batch in batches:
                yield batch
                progress.advance(task)

    def _progress_lines(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        started = said_at = time.monotonic()
        has_said = False
        for count, batch in enumerate(batches, start=1):
            yield batch
            now = time.monotonic()
            if (not has_said and count >= PROGRESS_FIRST_BATCHES) or now - said_at >= PROGRESS_EVERY_SECONDS:
                has_said, said_at = True, now
                self.warn(
                    f"progress: {count:,} batches so far ({now - started:,.0f} s); the data has no length, "
                    "so the run goes on until it ends, --batches N is reached, or Ctrl-C"
                )

    def loaded(self) -> None:
        """Startup is over: end the collector pause."""
        end_startup()


def observer_for(options: RunOptions) -> RunObserver:
    """The observer of this process: quiet with --quiet, and on every torchrun rank but 0 (whose
    notes would repeat rank 0's)."""
    is_rank_zero = os.environ.get("RANK", "0") in ("", "0")
    return ConsoleObserver(quiet=options.quiet or not is_rank_zero)


def pause_collector() -> None:
    """Pause the garbage collector until end_startup(): only for the console-script entry point."""
    global _is_collector_paused
    gc.disable()
    _is_collector_paused = True


def end_startup() -> None:
    """Freeze what startup built and turn the garbage collector that main() paused back on.

    Importing torch and loading the model make a few hundred thousand objects that live until
    exit. With the collector on, every full collection while they are being made scans them all
    again (docs/benchmarks.md measures what the pause saves). Frozen, they are also skipped by the
    collections between batches.

    No collection runs before the freeze, as it would cost what the pause saves; the few cycles
    startup leaves (a failed trial forward's traceback) are kept until exit.

    Where triton was imported (torch.export archives import it), the frozen objects are handed
    back to the collector at exit: the interpreter's last collection skips frozen ones, and
    triton's nanobind, which counts its live objects at shutdown, would print ~30 lines of "leaked
    instances" on stderr. Elsewhere that last collection over everything startup built is skipped,
    as it costs more than the pause saves (docs/benchmarks.md).
    """
    global _is_collector_paused
    if _is_collector_paused:
        _is_collector_paused = False
        gc.freeze()
        atexit.register(_unfreeze_where_counted)
        gc.enable()


def _unfreeze_where_counted() -> None:
    if "triton" in sys.modules:
        gc.unfreeze()
