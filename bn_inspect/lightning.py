"""``BNWatch``: a PyTorch Lightning callback that watches the BatchNorm layers while ``Trainer.fit`` trains.

    trainer = Trainer(callbacks=[BNWatch("runs/bn-watch.jsonl", every_n_steps=50)])

It opens ``bn_inspect.watch`` on the LightningModule when fitting starts, names each training
batch's step by ``trainer.global_step``, marks every validation run in the timeline and measures
the train/eval gap there (each layer's departure of the validation data from its running
statistics: the watch's ``validation()``), and closes the timeline when fitting ends or fails.
Lightning is imported by this module alone, never by ``import bn_inspect``. It comes as two
packages whose Trainers each take only their own package's callbacks: the unified ``lightning``
(``lightning.pytorch.Trainer``) and the older ``pytorch_lightning``. ``BNWatch`` subclasses the
``Callback`` of each one installed, so the same class works with either Trainer, whichever the
user trains with (``CALLBACK_PACKAGES`` names those found).
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from bn_inspect.errors import WatchError

if TYPE_CHECKING:
    from bn_inspect.analyses.watch import Watch


def _callback_bases() -> dict[str, type]:
    bases = {}
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases[package] = importlib.import_module(package).Callback
        except ImportError:
            continue
    if not bases:
        raise ImportError(
            "bn_inspect.lightning needs PyTorch Lightning (the lightning or the pytorch_lightning package). "
            "Install it: python -m pip install 'bn-inspect[lightning]'"
        )
    return bases


_BASES = _callback_bases()
# The Lightning packages found, whose Trainers take BNWatch: "lightning.pytorch", "pytorch_lightning".
CALLBACK_PACKAGES = tuple(_BASES)


class BNWatch(*_BASES.values()):  # type: ignore[misc]
    """Watch the LightningModule's BatchNorm layers during ``fit`` and write a timeline to ``path``.

    A ``Callback`` of every Lightning package installed (``CALLBACK_PACKAGES``): pass it to a
    ``lightning.pytorch.Trainer`` or a ``pytorch_lightning.Trainer`` alike.

    Args:
        path: the timeline to create (never an existing file); under DDP rank r > 0 writes
            ``<stem>.rank<r><suffix>`` beside it. Read it with ``bn-inspect timeline``.
        every_n_steps: record a sample every this many training steps (``trainer.global_step``).
        detail_every: add per-channel statistics every this many samples (and at events).
        print_events: print each event to stderr as it is found.
        measure_validation: measure the train/eval gap at each validation run (the sanity check's excluded).

    Attributes:
        watch: the open watch during ``fit`` (its ``events`` and ``summary()``), kept after it ends.
    """

    def __init__(
        self,
        path: str | Path,
        every_n_steps: int = 50,
        *,
        detail_every: int = 20,
        print_events: bool = False,
        measure_validation: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise WatchError(
                f"every_n_steps must be a whole number of at least 1, not {every_n_steps!r}", "Pass every_n_steps=50"
            )
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self.detail_every = detail_every
        self.print_events = print_events
        self.measure_validation = measure_validation
        self.watch: Watch | None = None
        self._is_open = False
        self._validation: AbstractContextManager[None] | None = None

    @property
    def events(self) -> list[Any]:
        """The events found so far (none before ``fit`` starts)."""
        return list(self.watch.events) if self.watch is not None else []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Open the watch: the process group (under DDP) exists by now, so each rank names its own file."""
        from bn_inspect.analyses.watch import watch

        self.watch = watch(
            pl_module,
            self.path,
            every=self.every_n_steps,
            detail_every=self.detail_every,
            print_events=self.print_events,
        )
        self.watch.__enter__()
        self._is_open = True

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Name the coming training forwards' step: the trainer's optimizer steps so far."""
        if self.watch is not None and self._is_open:
            self.watch.step(int(trainer.global_step))

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        """Pool the validation run's statistics (not the sanity check's), at the trainer's current step."""
        if self.watch is None or not (self._is_open and self.measure_validation) or trainer.sanity_checking:
            return
        self.watch.step(int(trainer.global_step))
        self._validation = self.watch.validation()
        self._validation.__enter__()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Write the validation run's sample (phase "validation") and its train/eval gap."""
        validation, self._validation = self._validation, None
        if validation is not None:
            validation.__exit__(None, None, None)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Close the timeline with its end record."""
        self._close(None, None, None)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Close the timeline when fitting fails (its end record says where it stopped); the hooks go too."""
        self._close(type(exception), exception, exception.__traceback__)

    def _close(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._validation is not None:
            self._validation.__exit__(kind, error, traceback)
            self._validation = None
        if self.watch is not None and self._is_open:
            self._is_open = False
            self.watch.__exit__(kind, error, traceback)
