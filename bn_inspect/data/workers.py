"""The worker processes of bn-inspect's DataLoaders: only the parent answers Ctrl-C, and a dead worker is one line.

A Ctrl-C on a terminal reaches every process of the foreground group, the workers included: each
would stop with its own traceback while the parent reports the interrupt. So the workers ignore
SIGINT and take SIGTERM's default (the parent ends them with it when it shuts them down), and the
parent, which alone reports, says it once. Both signals are held while the workers start, so that
none arrives in the moment between a worker's fork and its new handlers (the parent's handler
would raise in the worker); what arrived is delivered to the parent when they are released.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch.utils.data import DataLoader

from bn_inspect.errors import InputError

_HELD = {signal.SIGINT, signal.SIGTERM}
# How torch's DataLoader words the error for a worker that died (killed, or exited on its own).
_WORKER_DEATH_PREFIX = "DataLoader worker (pid"


def quiet_worker(_worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader bn-inspect makes: SIGINT ignored, SIGTERM ends the worker silently."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)


def worker_batches(loader: DataLoader[Any], doing: str) -> Iterator[Any]:
    """What ``loader`` yields, its workers started with the signals held; a dead worker as one line.

    Args:
        loader: a DataLoader made with ``worker_init_fn=quiet_worker``.
        doing: what the workers do, for the message, e.g. ``decoding images``.

    Raises:
        InputError: a worker process died (killed, e.g. for memory, or crashed in a decoder).
    """
    with _signals_held():
        iterator = iter(loader)
    with _worker_deaths_deferred():
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except RuntimeError as error:
                if not _is_death(error):
                    raise
                raise _death_error(error, doing) from None
            yield item


def _is_death(error: RuntimeError) -> bool:
    """Whether ``error`` is torch's word that a worker process died."""
    return str(error).startswith(_WORKER_DEATH_PREFIX)


def _death_error(error: RuntimeError, doing: str) -> InputError:
    return InputError(
        f"a worker process {doing} ended unexpectedly: {str(error).strip().rstrip('.')}",
        "Run again; if it happens again, pass --workers 0 to do the work in this process "
        "(a worker killed for lack of memory: pass a smaller --batch-size)",
    )


@contextmanager
def _worker_deaths_deferred() -> Iterator[None]:
    """torch's SIGCHLD handler kept, but not its error.

    It raises a RuntimeError wherever this process happens to be when a worker dies: inside the
    model's forward (which would then seem to have failed), or at exit, when multiprocessing ends
    the workers of an interrupted run. The loader itself notices a dead worker within seconds,
    in ``next``, where ``worker_batches`` makes it the one-line error.
    """
    torch_handler = signal.getsignal(signal.SIGCHLD) if hasattr(signal, "SIGCHLD") else None
    if not callable(torch_handler) or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signal_number: int, frame: Any) -> None:
        try:
            torch_handler(signal_number, frame)
        except RuntimeError as error:
            if not _is_death(error):
                raise

    signal.signal(signal.SIGCHLD, handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGCHLD) is handler:
            signal.signal(signal.SIGCHLD, torch_handler)


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held (not lost) in this thread during the block; only the main thread has handlers."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
